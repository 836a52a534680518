"""`kit serve`: the prediction service (FastAPI + uvicorn) around one verified bundle."""

from kit.serve.app import create_app

__all__ = ["create_app"]
