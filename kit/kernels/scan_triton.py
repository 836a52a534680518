"""Fused Triton selective scan (forward and backward) as a torch.autograd.Function.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks it at tiny shapes).
The kernel module is loaded on first use, once per interpreter mode, so setting TRITON_INTERPRET in a
test does not depend on import order.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import torch

from kit.errors import KitError
from kit.kernels._inputs import check_scan_shapes

DEFAULT_CHUNK = 64
_LOADED: dict[tuple[bool, bool], ModuleType] = {}


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels() -> ModuleType:
    mode = (interpret_mode(), os.environ.get("KIT_TRITON_NATIVE_SCAN", "0") == "1")
    if mode not in _LOADED:
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise KitError("impl='triton' needs the triton package: pip install 'vertical-kit[gpu]'") from err
        path = os.path.join(os.path.dirname(__file__), "_triton_scan_kernels.py")
        name = "kit.kernels._triton_scan_kernels_" + ("interpret" if mode[0] else "compiled") + ("_native" if mode[1] else "")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # triton resolves kernel globals through the module
        spec.loader.exec_module(module)
        _LOADED[mode] = module
    return _LOADED[mode]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t.contiguous()


class TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus: bool, chunk: int, need_states: bool):
        k = _kernels()
        # The kernels index (B, D, L) and (B, G, N, L) tensors as row-major; callers often pass transposed views.
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D, z, delta_bias, h0 = (None if t is None else t.contiguous() for t in (D, z, delta_bias, h0))
        batch, dim, length = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        nchunks = -(-length // chunk)
        y = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        last = torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32)
        states = torch.empty(batch, dim, nchunks, dstate, device=u.device, dtype=torch.float32) if need_states else last
        grid = lambda meta: (triton_cdiv(dim, meta["BLOCK_D"]), batch)  # noqa: E731
        k.scan_fwd_kernel[grid](
            u, delta, A, B, C, _dummy(D, u), _dummy(z, u), _dummy(delta_bias, u), _dummy(h0, last),
            y, states, last,
            dim, length, dstate, dim // groups, nchunks,
            B.stride(0), B.stride(1), B.stride(2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            HAS_H0=h0 is not None, STORE_STATES=need_states, GROUPED=groups > 1,
            T=chunk, NP=max(2, _next_pow2(dstate)),
        )
        if need_states:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.meta = (softplus, chunk, h0 is not None)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        softplus, chunk, has_h0 = ctx.meta
        k = _kernels()
        batch, dim, length = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        nchunks = states.shape[2]
        f32 = dict(device=u.device, dtype=torch.float32)
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)
        dz = None if z is None else torch.empty(z.shape, dtype=z.dtype, device=z.device)
        dA = torch.empty(batch, dim, dstate, **f32)
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        dD = torch.empty(batch, dim, **f32) if D is not None else None
        dbias = torch.empty(batch, dim, **f32) if delta_bias is not None else None
        dh0 = torch.empty(batch, dim, dstate, **f32)
        grid = lambda meta: (triton_cdiv(dim, meta["BLOCK_D"]), batch)  # noqa: E731
        k.scan_bwd_kernel[grid](
            u, delta, A, B, C, _dummy(D, u), _dummy(z, u), _dummy(delta_bias, u), states,
            dy.contiguous(), _dummy(dlast, dh0),
            du, ddelta, _dummy(dz, du), dA, dB, dC, _dummy(dD, dA), _dummy(dbias, dA), dh0,
            dim, length, dstate, dim // groups, nchunks,
            B.stride(0), B.stride(1), B.stride(2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            HAS_DLAST=dlast is not None, GROUPED=groups > 1,
            T=chunk, NP=max(2, _next_pow2(dstate)),
        )
        return (
            du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype), dz,
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
            dh0 if has_h0 else None, None, None, None,
        )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def selective_scan_triton(
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
    """Same contract as ``selective_scan``; ``chunk_size`` (a power of two) sets the steps per tile."""
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if not u.is_cuda and not interpret_mode():
        raise KitError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); use impl='chunked' on CPU")
    length = u.shape[-1]
    chunk = chunk_size or min(DEFAULT_CHUNK, max(2, _next_pow2(length)))
    if chunk & (chunk - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk}")
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    h0 = None if initial_state is None else initial_state.float()
    # Chunk-start states are only written when a backward can follow (ctx.needs_input_grad ignores no_grad).
    tensors = (u, delta, A, B4, C4, D, z, delta_bias, h0)
    need_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, last = TritonScan.apply(*tensors, delta_softplus, chunk, need_states)
    return (y, last) if return_last_state else y


def compile_ahead(arch: int = 90, act_dtype: str = "bf16", grouped: bool = False, chunk: int = DEFAULT_CHUNK) -> dict:
    """Compile both kernels for an NVIDIA target without a GPU (triton ships ptxas), at each one's default block
    shape with every option on. Returns {kernel name: compiled kernel}; raises on any compile error.

    Catches what the interpreter cannot (it runs kernels as Python): compile-time type and constexpr errors.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpret_mode():
        raise KitError("compile_ahead needs TRITON_INTERPRET unset")
    k = _kernels()
    act = {"u_ptr", "dt_ptr", "z_ptr", "y_ptr", "B_ptr", "C_ptr", "dy_ptr", "du_ptr", "ddt_ptr", "dz_ptr"}
    flags = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "GROUPED": grouped, "T": chunk, "NP": 16}
    out = {}
    for name, extra, shapes in (
        ("scan_fwd_kernel", {"HAS_H0": True, "STORE_STATES": True}, k.FWD_SHAPES),
        ("scan_bwd_kernel", {"HAS_DLAST": True}, k.BWD_SHAPES),
    ):
        fn = getattr(k, name).fn  # the JITFunction under the autotuner
        block_d, warps = shapes[1]
        constexprs = {**flags, **extra, "BLOCK_D": block_d}
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*" + (act_dtype if arg in act else "fp32")
            else:
                signature[arg] = "i32"
        src = ASTSource(fn, signature, constexprs)
        out[name] = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 1})
    return out
