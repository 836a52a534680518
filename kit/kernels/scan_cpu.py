"""Fused selective scan on CPU: a C++ extension (csrc/selective_scan_cpu.cpp) compiled on first use.

One task per (batch, channel) pair keeps its N-float state in registers/L1 and walks the sequence once; the
backward recomputes each 64-step chunk's states from the saved chunk-start states and runs the adjoint in
reverse time. Threads come from ``torch.get_num_threads()``. The build needs a C++ compiler and ``ninja``;
``extension_available()`` tries it once and remembers a failure so ``auto`` can fall back to ``chunked``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from kit.errors import KitError
from kit.kernels._inputs import check_scan_shapes, compute_dtype

CHUNK = 64
_SOURCE = Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp"
_LOCK = threading.Lock()
_EXT = None
_BUILD_ERROR: str | None = None
log = logging.getLogger(__name__)


def _build():
    from torch.utils.cpp_extension import load

    # -O3 without -march=native or -ffast-math: the build runs on any x86-64/aarch64 and results do not depend
    # on the build machine. -fno-trapping-math changes no result (it lets GCC vectorize the clamped exp, since
    # nobody reads the FP exception flags); -fopenmp makes at::parallel_for use torch's thread pool.
    flags = ["-O3", "-fno-trapping-math", "-fopenmp"]
    return load(name="kit_selective_scan_cpu", sources=[str(_SOURCE)], extra_cflags=flags,
                extra_ldflags=["-fopenmp"], verbose=False)


def load_extension():
    """The compiled extension, building it on first call; raises KitError (once cached) if it cannot build."""
    global _EXT, _BUILD_ERROR
    with _LOCK:
        if _EXT is None and _BUILD_ERROR is None:
            try:
                if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
                    raise RuntimeError("no C++ compiler on PATH")
                _EXT = _build()
            except Exception as exc:  # a compiler, ninja or header problem: report it once, then fall back
                _BUILD_ERROR = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                log.warning("the CPU selective-scan extension did not build (%s); using the chunked PyTorch scan",
                            _BUILD_ERROR)
        if _EXT is None:
            raise KitError(f"the 'cpu' selective-scan extension could not be built ({_BUILD_ERROR}); "
                           "install a C++ compiler and ninja, or use impl='chunked'")
        return _EXT


def extension_available() -> bool:
    """True when the extension is built or builds now (a failure is remembered, not retried)."""
    try:
        load_extension()
    except KitError:
        return False
    return True


class CpuScan(torch.autograd.Function):
    """u, delta (B, D, L); A (D, N); Bt, Ct (B, G, L, N); h0 (B, D, N) or None -> y (B, D, L), last (B, D, N)."""

    @staticmethod
    def forward(ctx, u, delta, A, Bt, Ct, h0):
        ext = load_extension()
        y, last, starts = ext.forward(u, delta, A, Bt, Ct, h0, CHUNK)
        ctx.save_for_backward(u, delta, A, Bt, Ct, starts)
        ctx.has_h0 = h0 is not None
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, Bt, Ct, starts = ctx.saved_tensors
        dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype).contiguous()
        dlast = None if dlast is None else dlast.to(u.dtype).contiguous()
        grads = load_extension().backward(u, delta, A, Bt, Ct, starts, dy, dlast, ctx.has_h0, CHUNK)
        du, ddelta, dA, dB, dC = grads[:5]
        return du, ddelta, dA, dB, dC, (grads[5] if ctx.has_h0 else None)


def selective_scan_cpu(
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
    """Same contract as ``selective_scan``; CPU tensors only. fp16/bf16 inputs are scanned in fp32."""
    batch, dim, length, dstate, groups = check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if u.device.type != "cpu":
        raise KitError(f"impl='cpu' needs CPU tensors, got {u.device}; use impl='triton' or 'chunked' on GPU")
    dtype_in, ct = u.dtype, compute_dtype(u)
    u_c, delta_c = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)  # threshold 20, as torch and mamba-ssm do
    # Time-major B/C so the kernel's inner loop over the state is unit-stride.
    Bt = (B if B.dim() == 4 else B.unsqueeze(1)).to(ct).transpose(-1, -2).contiguous()
    Ct = (C if C.dim() == 4 else C.unsqueeze(1)).to(ct).transpose(-1, -2).contiguous()
    h0 = None if initial_state is None else initial_state.to(ct).contiguous()
    y, last = CpuScan.apply(u_c.contiguous(), delta_c.contiguous(), A.to(ct).contiguous(), Bt, Ct, h0)
    if D is not None:
        y = y + u_c * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(dtype_in)
    return (out, last) if return_last_state else out
