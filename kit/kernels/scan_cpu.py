"""Fused selective scan on CPU: a C++ extension (csrc/selective_scan_cpu.cpp) compiled on first use.

The kernel vectorises across channels (one SIMD vector = 16 fp32 channels with AVX-512, 8 with AVX2), keeps the N
states of a channel block in registers and walks the sequence once; softplus(delta + delta_bias), the D skip and the
SiLU(z) gate are fused into its forward and backward. The backward recomputes each 64-step chunk's states from the
saved chunk-start states and runs the adjoint in reverse time. Inputs are read time-major, (batch, length, channels),
the layout a Mamba block's projections produce, so most of them need no copy. Threads come from
``torch.get_num_threads()``.

Build: ``-march=native`` (x86-64) or ``-mcpu=native`` (aarch64) with FMA contraction, cached under a name keyed by
the flags and a hash of this CPU's feature flags, so a home directory shared between machines never loads a binary
built for another CPU. ``KIT_CPU_SCAN_PORTABLE=1`` builds the baseline-ISA version instead (SSE2/NEON, no FMA).
Results are deterministic on one machine and build (any thread count >= the number of (batch, group) rows gives the
same bits), but not bitwise equal between the native and portable builds or across CPUs: FMA contraction and the
vector width change the rounding (differences of a few fp32 ulp). The build needs a C++ compiler and ``ninja``;
``extension_available()`` tries it once and remembers a failure so ``auto`` can fall back to ``chunked``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from kit.errors import KitError
from kit.kernels._inputs import check_scan_shapes, compute_dtype

CHUNK = 64
PORTABLE_ENV = "KIT_CPU_SCAN_PORTABLE"
_SOURCE = Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp"
_LOCK = threading.Lock()
_EXT = None
_BUILD_ERROR: str | None = None
_BUILD: dict[str, object] = {}
log = logging.getLogger(__name__)
# -fno-trapping-math changes no result (nobody reads the FP exception flags; it lets GCC vectorise the clamps);
# -fopenmp makes at::parallel_for use torch's thread pool.
BASE_FLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]


def cpu_features() -> str:
    """This CPU's feature flags (x86 ``flags`` / arm ``Features`` of /proc/cpuinfo), or the platform's names."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("flags", "Features"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def build_config(portable: bool | None = None) -> tuple[str, list[str]]:
    """(extension name, compiler flags): native SIMD unless ``KIT_CPU_SCAN_PORTABLE`` is set or the arch is unknown."""
    if portable is None:
        portable = os.environ.get(PORTABLE_ENV, "").strip().lower() in ("1", "true", "yes")
    arch = platform.machine().lower()
    native = {"x86_64": "-march=native", "amd64": "-march=native", "aarch64": "-mcpu=native", "arm64": "-mcpu=native"}
    if portable or arch not in native:
        return "kit_selective_scan_cpu_portable", list(BASE_FLAGS)
    # FMA contraction (off by default under -std=c++NN): faster and more accurate, machine-dependent rounding.
    flags = [*BASE_FLAGS, native[arch], "-ffp-contract=fast"]
    key = hashlib.sha256((" ".join(flags) + "|" + cpu_features()).encode()).hexdigest()[:12]
    return f"kit_selective_scan_cpu_native_{key}", flags


def _build(portable: bool | None = None):
    from torch.utils.cpp_extension import load

    name, flags = build_config(portable)
    ext = load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    _BUILD.update(name=name, flags=flags)
    return ext


def build_info() -> dict[str, object]:
    """Name, flags and target ISA of the loaded extension (for benchmarks and bug reports)."""
    ext = load_extension()
    return {**_BUILD, "isa": ext.isa(), "vector_bytes": ext.vector_bytes()}


def load_extension():
    """The compiled extension, building it on first call; raises KitError (once cached) if it cannot build."""
    global _EXT, _BUILD_ERROR
    with _LOCK:
        if _EXT is None and _BUILD_ERROR is None:
            try:
                if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
                    raise RuntimeError("no C++ compiler on PATH")
                try:
                    _EXT = _build()
                except Exception as exc:  # e.g. a compiler without -march=native: the portable build may still work
                    if build_config()[0].endswith("_portable"):
                        raise
                    log.warning("the native CPU selective-scan build failed (%s); trying the portable one", exc)
                    _EXT = _build(portable=True)
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
    """Time-major: u, delta, z (B, L, D'); A (D', N); Bt, Ct (B, G, L, N); D, bias (D',); h0 (B, D', N) or None
    (D' = channels padded per group to the SIMD width) -> y (B, L, D'), last (B, D', N). Returns every input's grad."""

    @staticmethod
    def forward(ctx, u, delta, A, Bt, Ct, D, z, bias, h0, softplus):
        ext = load_extension()
        y, last, starts = ext.forward(u, delta, A, Bt, Ct, D, z, bias, h0, softplus, CHUNK)
        ctx.save_for_backward(u, delta, A, Bt, Ct, D, z, bias, starts)
        ctx.softplus, ctx.has_h0 = softplus, h0 is not None
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, Bt, Ct, D, z, bias, starts = ctx.saved_tensors
        dy = torch.zeros_like(u, memory_format=torch.contiguous_format) if dy is None else dy.to(u.dtype).contiguous()
        dlast = None if dlast is None else dlast.to(u.dtype).contiguous()
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = load_extension().backward(
            u, delta, A, Bt, Ct, D, z, bias, ctx.softplus, starts, dy, dlast, ctx.has_h0, CHUNK)
        # Per-batch-row partials (and per-part dB/dC when rows < threads), summed in a fixed order.
        dA = dA.sum(0).t()
        dB = dB[0] if dB.shape[0] == 1 else dB.sum(0)
        dC = dC[0] if dC.shape[0] == 1 else dC.sum(0)
        dD = None if dD is None else dD.sum(0)
        dbias = None if dbias is None else dbias.sum(0)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, None


def _pad_channels(x: torch.Tensor, groups: int, hpad: int) -> torch.Tensor:
    """Pad the last (channel) axis per group from dim/groups to hpad channels with zeros."""
    hdim = x.shape[-1] // groups
    if hdim == hpad:
        return x
    return F.pad(x.unflatten(-1, (groups, hdim)), (0, hpad - hdim)).flatten(-2)


def _unpad_channels(x: torch.Tensor, groups: int, hdim: int) -> torch.Tensor:
    hpad = x.shape[-1] // groups
    if hdim == hpad:
        return x
    return x.unflatten(-1, (groups, hpad))[..., :hdim].flatten(-2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


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
    """Same contract as ``selective_scan``; CPU tensors only. fp16/bf16 inputs are scanned in fp32.

    Fastest when u, delta and z are time-major in memory (transposed views of (B, L, D) tensors, as a Mamba
    block makes them) and B, C are views with a unit state stride: then nothing is copied.
    """
    batch, dim, length, dstate, groups = check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if u.device.type != "cpu":
        raise KitError(f"impl='cpu' needs CPU tensors, got {u.device}; use impl='triton' or 'chunked' on GPU")
    ext = load_extension()
    dtype_in, ct = u.dtype, compute_dtype(u)
    lanes = ext.vector_bytes() // torch.empty((), dtype=ct).element_size()
    hdim = dim // groups
    hpad = -(-hdim // lanes) * lanes

    def time_major(x):  # (B, D, L) -> (B, L, D') with unit channel stride
        return _unit_last(_pad_channels(x.to(ct).transpose(1, 2), groups, hpad))

    def channels(x):  # (D,) -> (D',)
        return None if x is None else _pad_channels(x.to(ct), groups, hpad).contiguous()

    Bt = _unit_last((B if B.dim() == 4 else B.unsqueeze(1)).to(ct).transpose(-1, -2))
    Ct = _unit_last((C if C.dim() == 4 else C.unsqueeze(1)).to(ct).transpose(-1, -2))
    A_p = _pad_channels(A.to(ct).t(), groups, hpad).t().contiguous()
    h0 = None
    if initial_state is not None:
        h0 = _pad_channels(initial_state.to(ct).transpose(1, 2), groups, hpad).transpose(1, 2).contiguous()
    y, last = CpuScan.apply(time_major(u), time_major(delta), A_p, Bt, Ct, channels(D),
                            None if z is None else time_major(z), channels(delta_bias), h0, bool(delta_softplus))
    out = _unpad_channels(y, groups, hdim).transpose(1, 2).to(dtype_in)
    if not return_last_state:
        return out
    return out, _unpad_channels(last.transpose(1, 2), groups, hdim).transpose(1, 2)


class CpuCausalConv(torch.autograd.Function):
    """Causal depthwise conv1d (+ SiLU), time-major: x (B, L, D) with unit channel stride, wT (K, D), bias (D,)."""

    @staticmethod
    def forward(ctx, x, wT, bias, silu):
        out = load_extension().conv_forward(x, wT, bias, silu)
        ctx.save_for_backward(x, wT, bias)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, wT, bias = ctx.saved_tensors
        dx, dw, db = load_extension().conv_backward(x, wT, bias, dout.contiguous(), ctx.silu)
        # Per-(batch, 64-row tile) partials, summed in a fixed order.
        return dx, dw.sum(0), None if db is None else db.sum(0), None


def causal_conv1d_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """``causal_conv1d`` without streaming state, fp32/fp64 CPU tensors: x (B, D, L) -> (B, D, L).

    Reads x time-major (a Mamba block's in_proj output, transposed, needs no copy) and returns a transposed view of
    a time-major result, the layout x_proj and the fused scan read without copies.
    """
    out = CpuCausalConv.apply(_unit_last(x.transpose(1, 2)), weight.to(x.dtype).t().contiguous(),
                              None if bias is None else bias.to(x.dtype).contiguous(), bool(silu))
    return out.transpose(1, 2)


def mixer_step_cpu(xz: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                   x_proj, dt_proj, A: torch.Tensor, D: torch.Tensor | None, ssm_state: torch.Tensor,
                   time_step_rank: int) -> torch.Tensor:
    """A Mamba mixer's step between in_proj and out_proj for one position per row, fp32 CPU, no autograd:
    xz (B, 2D) (in_proj's output), conv_state (B, D, K-1), conv_weight (D, K), A (D, N), ssm_state (B, D, N) ->
    y (B, D). x_proj and dt_proj are called as modules (a LoRA adapter on them applies). Two fused kernels replace
    the dozen small ops of `MambaMixer.step`'s PyTorch path; the state is read, never written."""
    ext = load_extension()
    dim = conv_weight.shape[0]
    x = ext.conv_step(xz, conv_state.contiguous(), conv_weight.t().contiguous(), conv_bias)
    proj = x_proj(x)  # (B, R + 2N): dt, B, C
    delta = dt_proj(proj[:, :time_step_rank])
    return ext.ssm_step(x, delta, A.contiguous(), proj[:, time_step_rank:], D, xz[:, dim:], ssm_state.contiguous(), True)
