"""kit: domain-vertical fine-tuning for clinical and financial records."""

__version__ = "0.1.0"

__all__ = ["__version__"]
