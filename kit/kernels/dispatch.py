"""``selective_scan``: one entry point, several implementations, picked per device or forced by name."""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from kit.errors import KitError

ENV_VAR = "KIT_SCAN_IMPL"
# name -> (module, function); modules import lazily so triton/mamba_ssm stay optional.
IMPLS: dict[str, tuple[str, str]] = {
    "reference": ("kit.kernels.scan_reference", "selective_scan_reference"),
    "chunked": ("kit.kernels.scan_chunked", "selective_scan_chunked"),
    "triton": ("kit.kernels.scan_triton", "selective_scan_triton"),
    "mamba_ssm": ("kit.kernels.scan_mamba_ssm", "selective_scan_mamba_ssm"),
    "cpu": ("kit.kernels.scan_cpu", "selective_scan_cpu"),
}
# On CPU, auto takes the fused C++ scan when it builds (once, on first use) and the chunked PyTorch scan otherwise.
CPU_FAST = "cpu"
CPU_DEFAULT = "chunked"


def triton_available() -> bool:
    """True when triton imports (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_extension_available() -> bool:
    """True when the fused CPU scan's C++ extension builds (tried once per process, a failure is logged)."""
    from kit.kernels.scan_cpu import extension_available

    return extension_available()


def resolve_impl(impl: str, device: torch.device) -> str:
    """Turn ``impl`` ("auto" or a name) into a concrete implementation name.

    ``auto`` honours the ``KIT_SCAN_IMPL`` environment variable, else picks triton on CUDA, the compiled ``cpu``
    scan on CPU when its extension builds, and chunked otherwise.
    """
    if impl == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            impl = forced
            if impl not in IMPLS:
                raise KitError(f"{ENV_VAR}={forced!r} is not a selective-scan implementation; choose one of: auto, {', '.join(IMPLS)}")
        elif device.type == "cuda" and triton_available():
            impl = "triton"
        elif device.type == "cpu" and cpu_extension_available():
            impl = CPU_FAST
        else:
            impl = CPU_DEFAULT
    if impl not in IMPLS:
        raise KitError(f"unknown selective-scan implementation {impl!r}; choose one of: auto, {', '.join(IMPLS)}")
    return impl


def get_impl(name: str) -> Callable:
    module, func = IMPLS[name]
    return getattr(importlib.import_module(module), func)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    impl: str = "auto",
):
    """Selective scan with mamba-ssm's semantics.

    u, delta: (batch, dim, length); A: (dim, dstate); B, C: (batch, dstate, length) or grouped
    (batch, groups, dstate, length); D, delta_bias: (dim,); z: like u (output gate ``y * silu(z)``);
    initial_state: (batch, dim, dstate). Accumulates in fp32 and returns y in u's dtype, or
    ``(y, last_state)`` with an fp32 (batch, dim, dstate) state when ``return_last_state``.
    ``impl``: "auto", "reference", "chunked", "cpu" (fused C++ scan, compiled on first use), "triton" or "mamba_ssm".
    $KIT_TRITON_SCAN_T sets the Triton kernels' steps per tile (a power of two, default 512).

    Example::

        y = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=dt_bias, delta_softplus=True)
    """
    fn = get_impl(resolve_impl(impl, u.device))
    return fn(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, return_last_state=return_last_state,
    )
