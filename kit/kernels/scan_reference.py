"""The oracle: a plain sequential selective scan in PyTorch (fp32, or fp64 for fp64 inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kit.kernels._inputs import check_scan_shapes, compute_dtype


def selective_scan_reference(
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
    """h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t;  y_t = C_t . h_t (+ D u_t) (* silu(z_t)).

    One time step per loop iteration, so it is slow but obviously right; autograd gives its gradients.
    """
    batch, dim, length, dstate, groups = check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in, ct = u.dtype, compute_dtype(u)
    u_c, delta_c, A_c = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    # Channels as (groups, dim // groups) so each group's B_t/C_t broadcasts over its channels; time steps
    # are unbound once up front (indexing per step would make autograd allocate full-size gradients per step).
    hdim = dim // groups
    B_steps = (B if B.dim() == 4 else B.unsqueeze(1)).to(ct).unsqueeze(2).unbind(-1)
    C_steps = (C if C.dim() == 4 else C.unsqueeze(1)).to(ct).unsqueeze(2).unbind(-1)
    delta_steps = delta_c.reshape(batch, groups, hdim, length, 1).unbind(-2)
    u_steps = u_c.reshape(batch, groups, hdim, length, 1).unbind(-2)
    A_g = A_c.reshape(groups, hdim, dstate)
    if initial_state is None:
        h = u_c.new_zeros(batch, groups, hdim, dstate)
    else:
        h = initial_state.to(ct).reshape(batch, groups, hdim, dstate)
    ys = []
    for t in range(length):
        h = torch.exp(delta_steps[t] * A_g) * h + (delta_steps[t] * u_steps[t]) * B_steps[t]
        ys.append((h * C_steps[t]).sum(-1))
    h = h.reshape(batch, dim, dstate)
    y = torch.stack(ys, dim=-1).reshape(batch, dim, length)
    if D is not None:
        y = y + u_c * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out
