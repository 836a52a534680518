"""Prediction with a bundle: the `Predictor` (Python API), `kit predict` (batch) and the wire formats `kit serve` uses.

Names are imported on first use, so `kit --help` (which imports kit.predict.cli) does not load polars or torch.
"""

__all__ = ["BadInput", "Prediction", "Predictor", "SubjectData"]


def __getattr__(name: str):
    if name in ("BadInput", "SubjectData"):
        from kit.predict import formats

        return getattr(formats, name)
    if name in ("Prediction", "Predictor"):
        from kit.predict import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'kit.predict' has no attribute {name!r}")
