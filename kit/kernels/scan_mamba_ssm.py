"""mamba-ssm's CUDA selective scan behind our signature, for comparison only (never required)."""

from __future__ import annotations

import torch

from kit.errors import KitError
from kit.kernels._inputs import check_scan_shapes


def selective_scan_mamba_ssm(
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
):
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # mamba_ssm raises more than ImportError when its CUDA extension is missing
        raise KitError(
            "impl='mamba_ssm' needs the mamba-ssm package with its CUDA extension (pip install 'vertical-kit[mamba]' "
            f"on a CUDA machine); it failed to import: {err}. Use impl='triton' on GPU or 'chunked' on CPU."
        ) from err
    if initial_state is not None:
        raise KitError("impl='mamba_ssm' does not take an initial state; use impl='triton' or 'chunked' for streaming")
    if not u.is_cuda:
        raise KitError("impl='mamba_ssm' runs on CUDA tensors only")
    out = selective_scan_fn(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )
    if return_last_state:
        y, last = out
        return y, last.float()
    return out
