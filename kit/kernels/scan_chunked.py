"""Chunked selective scan in plain PyTorch: the CPU default, forward and a hand-written backward.

The sequence is cut into K chunks of T steps. Every loop runs over the T positions of a chunk while
operating on all K chunks at once (tensors of B*D*K*N elements), and a short loop over K carries the
state across chunk boundaries. The only exponentials are exp(delta_t A) and their products over a chunk,
never a ratio of cumulative products, so with delta >= 0 and A <= 0 (as in Mamba) every exponent is <= 0
and the scan is stable in fp32 for any sequence length. The backward recomputes the states from the saved
chunk-start states instead of keeping autograd's per-step graph; its (T, B, D, K, N) scratch buffers are
kept per thread between calls (``clear_workspace`` frees them).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from kit.kernels._inputs import check_scan_shapes, compute_dtype

# Elements per step tensor (batch * dim * chunks * dstate): on CPU small enough to stay in cache while
# amortising Python's per-op overhead (tuned on a 2-core CPU, see bench/kernels.py); on a GPU large enough
# that each step's kernels fill the device.
TARGET_STEP_ELEMENTS = {"cpu": 1 << 17, "cuda": 1 << 23}


def pick_chunk_size(batch: int, dim: int, length: int, dstate: int, device: str = "cpu") -> int:
    target = TARGET_STEP_ELEMENTS.get(device, TARGET_STEP_ELEMENTS["cpu"])
    chunks = max(1, min(length, target // max(1, batch * dim * dstate)))
    return math.ceil(length / chunks)


def _to_steps(x: torch.Tensor, groups: int, chunk: int) -> torch.Tensor:
    """(batch, dim, Lp) -> (T, batch, groups, K, dim // groups), contiguous per step."""
    b, d, lp = x.shape
    return x.reshape(b, groups, d // groups, lp // chunk, chunk).permute(4, 0, 1, 3, 2).contiguous()


def _from_steps(x: torch.Tensor, length: int) -> torch.Tensor:
    t, b, g, k, h = x.shape
    return x.permute(1, 2, 4, 3, 0).reshape(b, g * h, k * t)[..., :length]


def _bc_to_steps(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(batch, groups, N, Lp) -> (T, batch, groups, K, N)."""
    b, g, n, lp = x.shape
    return x.reshape(b, g, n, lp // chunk, chunk).permute(4, 0, 1, 3, 2).contiguous()


def _bc_from_steps(x: torch.Tensor, length: int) -> torch.Tensor:
    t, b, g, k, n = x.shape
    return x.permute(1, 2, 4, 3, 0).reshape(b, g, n, k * t)[..., :length]


_WORKSPACE = threading.local()
# Largest per-step decay table exp(delta A) (T, B, D, K, N) kept in the workspace; above it, decays are
# recomputed at every step instead (slower, but memory stays at a few step-sized tensors).
DECAY_TABLE_MAX_BYTES = 256 * 2**20


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch tensor reused across calls (per thread and name): allocating (T, B, D, K, N) buffers afresh
    at every training step costs more in page faults than the scan itself on CPU."""
    numel = math.prod(shape)
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACE.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        buf = bufs[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def clear_workspace() -> None:
    """Free this thread's scratch buffers (they are kept between calls to avoid page faults)."""
    _WORKSPACE.bufs = {}


class _Decays:
    """exp(delta_t A) for each step: one vectorised pass into the workspace when it fits, else per step."""

    def __init__(self, dt: torch.Tensor, Ah: torch.Tensor, state_shape: tuple[int, ...]) -> None:
        self.dt, self.Ah = dt, Ah
        shape = (dt.shape[0], *state_shape)
        self.table = None
        if math.prod(shape) * dt.element_size() <= DECAY_TABLE_MAX_BYTES:
            self.table = _workspace("decays", shape, dt.dtype, dt.device)
            torch.mul(dt.unsqueeze(-1), Ah, out=self.table).exp_()
        else:
            self.step = torch.empty(state_shape, dtype=dt.dtype, device=dt.device)

    def __getitem__(self, t: int) -> torch.Tensor:
        if self.table is not None:
            return self.table[t]
        return torch.mul(self.dt[t].unsqueeze(-1), self.Ah, out=self.step).exp_()


class ChunkedScan(torch.autograd.Function):
    """Core scan y_t = C_t . h_t, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t (no D, z, bias)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk: int):
        batch, dim, length = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        hdim = dim // groups
        nchunks = math.ceil(length / chunk)
        pad = nchunks * chunk - length
        if pad:
            # delta = 0 leaves the state untouched, so padded steps change neither y nor the last state.
            u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
            B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
        dt, us = _to_steps(delta, groups, chunk), _to_steps(u, groups, chunk)
        dtu = dt * us
        Bs, Cs = _bc_to_steps(B, chunk), _bc_to_steps(C, chunk)
        Ah = A.reshape(1, groups, 1, hdim, dstate)
        state_shape = (batch, groups, nchunks, hdim, dstate)

        # 1) state at each chunk's end when the chunk starts from zero.
        decays = _Decays(dt, Ah, state_shape)
        h = torch.zeros(state_shape, dtype=u.dtype, device=u.device)
        for t in range(chunk):
            h.mul_(decays[t]).addcmul_(dtu[t].unsqueeze(-1), Bs[t].unsqueeze(-2))
        # 2) carry states across chunk boundaries: H_k = P_k H_{k-1} + h_k.
        chunk_decay = torch.exp(dt.sum(0).unsqueeze(-1) * Ah)
        starts = torch.empty_like(h)
        carry = torch.zeros_like(h[:, :, 0]) if h0 is None else h0.reshape(batch, groups, hdim, dstate)
        for k in range(nchunks):
            starts[:, :, k] = carry
            carry = chunk_decay[:, :, k] * carry + h[:, :, k]
        # 3) rescan every chunk from its true start state, contracting with C as we go.
        h.copy_(starts)
        y = torch.empty((chunk, batch, groups, nchunks, hdim), dtype=u.dtype, device=u.device)
        for t in range(chunk):
            h.mul_(decays[t]).addcmul_(dtu[t].unsqueeze(-1), Bs[t].unsqueeze(-2))
            torch.matmul(h, Cs[t].unsqueeze(-1), out=y[t].unsqueeze(-1))
        ctx.save_for_backward(dt, us, Ah, Bs, Cs, starts, chunk_decay)
        ctx.meta = (length, dim, dstate, h0 is not None)
        return _from_steps(y, length), carry.reshape(batch, dim, dstate)

    @staticmethod
    def backward(ctx, dy, dlast):
        dt, us, Ah, Bs, Cs, starts, chunk_decay = ctx.saved_tensors
        dtu = dt * us
        length, dim, dstate, has_h0 = ctx.meta
        chunk, batch, groups, nchunks, hdim = dt.shape
        lp = chunk * nchunks
        dy = F.pad(dy.to(dt.dtype), (0, lp - length))
        dys = _to_steps(dy, groups, chunk)

        # Recompute the states into a reused workspace (h_{t-1} at index t) and dC along the way.
        hs = _workspace("states", (chunk + 1, *starts.shape), dt.dtype, dt.device)
        decays = _Decays(dt, Ah, starts.shape)
        dCs = torch.empty_like(Cs)
        hs[0] = starts
        for t in range(chunk):
            torch.mul(hs[t], decays[t], out=hs[t + 1]).addcmul_(dtu[t].unsqueeze(-1), Bs[t].unsqueeze(-2))
            torch.matmul(dys[t].unsqueeze(-2), hs[t + 1], out=dCs[t].unsqueeze(-2))
        # Adjoint that each chunk sends to the state before it, from its own outputs only.
        q = torch.zeros_like(starts)
        for t in reversed(range(chunk)):
            q.addcmul_(dys[t].unsqueeze(-1), Cs[t].unsqueeze(-2)).mul_(decays[t])
        # Carry adjoints across chunk boundaries, right to left.
        ends = torch.empty_like(starts)
        g = torch.zeros_like(starts[:, :, 0]) if dlast is None else dlast.to(dt.dtype).reshape(batch, groups, hdim, dstate)
        for k in reversed(range(nchunks)):
            ends[:, :, k] = g
            g = chunk_decay[:, :, k] * g + q[:, :, k]
        dh0 = g.reshape(batch, dim, dstate) if has_h0 else None
        # Rescan each chunk right to left with its true adjoint; gather input gradients per step.
        ddt = torch.empty_like(dt)
        ddtu = torch.empty_like(dt)
        dBs = torch.empty_like(Bs)
        dA_acc = q.zero_()
        g = ends
        for t in reversed(range(chunk)):
            a = decays[t]
            g.addcmul_(dys[t].unsqueeze(-1), Cs[t].unsqueeze(-2))  # g_t: dL/dh_t
            torch.matmul(dtu[t].unsqueeze(-2), g, out=dBs[t].unsqueeze(-2))
            torch.matmul(g, Bs[t].unsqueeze(-1), out=ddtu[t].unsqueeze(-1))
            g.mul_(a)  # a_t g_t: the adjoint handed to step t - 1
            s = hs[t].mul_(g)  # dL/d(delta_t A) = g_t a_t h_{t-1}, in h_{t-1}'s storage
            dA_acc.addcmul_(s, dt[t].unsqueeze(-1))
            torch.linalg.vecdot(s, Ah, out=ddt[t])
        dA = dA_acc.sum((0, 2)).reshape(dim, dstate)
        du = _from_steps(ddtu * dt, length)
        ddelta = _from_steps(ddt + ddtu * us, length)
        return du, ddelta, dA, _bc_from_steps(dBs, length), _bc_from_steps(dCs, length), dh0, None


def selective_scan_chunked(
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
    chunk_size: int | None = None,
):
    """Same contract as ``selective_scan``; ``chunk_size`` overrides the automatic choice."""
    batch, dim, length, dstate, groups = check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in, ct = u.dtype, compute_dtype(u)
    u_c, delta_c = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    B_c = (B if B.dim() == 4 else B.unsqueeze(1)).to(ct)
    C_c = (C if C.dim() == 4 else C.unsqueeze(1)).to(ct)
    h0 = None if initial_state is None else initial_state.to(ct)
    chunk = chunk_size or pick_chunk_size(batch, dim, length, dstate, u.device.type)
    y, last = ChunkedScan.apply(u_c, delta_c, A.to(ct), B_c, C_c, h0, min(chunk, length))
    if D is not None:
        y = y + u_c * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(dtype_in)
    return (out, last) if return_last_state else out
