"""Selective-scan and causal conv1d kernels (PyTorch reference/chunked, Triton on GPU)."""
