"""Selective-scan and causal conv1d kernels (PyTorch reference/chunked, Triton on GPU).

Importing this package needs only torch: triton and mamba_ssm load lazily when their implementation is used.
"""

from kit.kernels.conv1d import causal_conv1d
from kit.kernels.dispatch import IMPLS, resolve_impl, selective_scan

__all__ = ["IMPLS", "causal_conv1d", "resolve_impl", "selective_scan"]
