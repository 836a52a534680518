"""Shape checks shared by every selective-scan implementation."""

from __future__ import annotations

import torch


def check_scan_shapes(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Validate mamba-ssm shaped inputs; returns (batch, dim, length, dstate, groups)."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError("selective_scan needs length >= 1")
    if delta.shape != u.shape:
        raise ValueError(f"delta must match u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, dstate), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            want = (batch, dstate, length)
        elif t.dim() == 4:
            want = (batch, t.shape[1], dstate, length)
        else:
            raise ValueError(f"{name} must be (batch, dstate, length) or (batch, groups, dstate, length), got {tuple(t.shape)}")
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    groups = B.shape[1] if B.dim() == 4 else 1
    groups_c = C.shape[1] if C.dim() == 4 else 1
    if groups != groups_c:
        raise ValueError(f"B and C must have the same number of groups, got {groups} and {groups_c}")
    if dim % groups:
        raise ValueError(f"dim={dim} is not divisible by groups={groups}")
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"D must be (dim={dim},), got {tuple(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"delta_bias must be (dim={dim},), got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must match u {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, dstate):
        raise ValueError(f"initial_state must be (batch, dim, dstate)={(batch, dim, dstate)}, got {tuple(initial_state.shape)}")
    return batch, dim, length, dstate, groups


def compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp64 inputs scan in fp64 (for gradient checks); everything else accumulates in fp32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32
