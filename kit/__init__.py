"""kit: domain-vertical fine-tuning for clinical and financial records."""

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    # `from kit import Predictor` without importing polars/torch for every `import kit` (kit.kernels stays light).
    if name == "Predictor":
        from kit.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'kit' has no attribute {name!r}")
