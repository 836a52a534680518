"""Fused Triton selective scan (forward and backward) as a torch.autograd.Function.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks it at tiny shapes).
The kernel module is loaded on first use, once per interpreter mode, so setting TRITON_INTERPRET in a
test does not depend on import order.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from types import ModuleType

import torch

from kit.errors import KitError
from kit.kernels._inputs import check_scan_shapes

DEFAULT_CHUNK = 512  # steps per (BLOCK_D, T) tile (H100, L=2048: 2.6 ms fwd+bwd at 512, 3.2 at 1024)
DB_PARTS = 8  # copies of dB, dC the backward's atomics are spread over (8 MB each at B=8, N=16, L=2048)
CHUNK_ENV = "KIT_TRITON_SCAN_T"  # steps per tile when the caller gives no chunk_size
_LOADED: dict[tuple[bool, bool], ModuleType] = {}
_REV_MODE: dict[str, int] = {}


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
        name = ("kit.kernels._triton_scan_kernels_" + ("interpret" if mode[0] else "compiled")
                + ("_native" if mode[1] else ""))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # triton resolves kernel globals through the module
        spec.loader.exec_module(module)
        _LOADED[mode] = module
    return _LOADED[mode]


def _reverse_mode(device: torch.device) -> int:
    """How this Triton orders a reverse scan's combine operands (the backward's REV): probed once per device type.

    1 = combine(later, earlier), 2 = combine(earlier, later), 0 = neither matched (the backward then flips instead).
    $KIT_TRITON_REV_MODE forces one.
    """
    forced = os.environ.get("KIT_TRITON_REV_MODE", "").strip()
    if forced:
        return int(forced)
    key = f"{device.type}-{interpret_mode()}"
    if key not in _REV_MODE:
        k = _kernels()
        gen = torch.Generator().manual_seed(0)
        # bf16 inputs give the kernels' layouts (8 steps per thread): a warp per row (4 warps), a row across warps
        # (4 warps), two rows in one warp (1 warp).
        tiles = []
        for rows, steps, warps in ((4, 256, 4), (1, 1024, 4), (2, 128, 1)):
            a = (torch.rand(rows, steps, generator=gen) * 0.5 + 0.5).to(torch.bfloat16)
            c = torch.randn(rows, steps, generator=gen).to(torch.bfloat16)
            want = c.double().clone()
            for t in range(steps - 2, -1, -1):
                want[:, t] += a[:, t + 1].double() * want[:, t + 1]
            tiles.append((a.to(device), c.to(device), want.float().to(device), warps))
        _REV_MODE[key] = 0
        for mode in (1, 2):
            ok = True
            for a, c, want, warps in tiles:
                g = torch.full(a.shape, float("nan"), device=device)
                try:
                    k.rev_probe_kernel[(1,)](a, c, g, R=a.shape[0], T=a.shape[1], REV=mode, num_warps=warps)
                except Exception as err:  # noqa: BLE001 - a reverse scan that does not build counts as a mismatch
                    warnings.warn(f"reverse-scan probe, mode {mode}: {type(err).__name__}: {err}"[:500])
                    ok = False
                    break
                ok = ok and torch.allclose(g, want, rtol=1e-3, atol=1e-3)
            if ok:
                _REV_MODE[key] = mode
                break
    return _REV_MODE[key]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _carry_width(chunk: int, dstate: int) -> int:
    """Width NP of the kernels' (BLOCK_D, NP) per-state tiles (state n in column n: carries in and out, dA); NP = T
    lets them share the (BLOCK_D, T) tiles' register layout."""
    return max(chunk, 2, _next_pow2(dstate))


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
        flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                     HAS_H0=h0 is not None, STORE_STATES=need_states, GROUPED=groups > 1,
                     T=chunk, NSTATE=dstate, NP=_carry_width(chunk, dstate))
        args = (u, delta, A, B, C, _dummy(D, u), _dummy(z, u), _dummy(delta_bias, u), _dummy(h0, last), y, states, last)
        strides = (B.stride(0), B.stride(1), B.stride(2))
        k.scan_fwd_kernel[grid](*args, dim, length, dim // groups, nchunks, *strides, **flags)
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
        # The kernel spreads its dB/dC atomics over DB_PARTS copies (summed below).
        dB, dC = torch.zeros((DB_PARTS, *B.shape), **f32), torch.zeros((DB_PARTS, *C.shape), **f32)
        dD = torch.empty(batch, dim, **f32) if D is not None else None
        dbias = torch.empty(batch, dim, **f32) if delta_bias is not None else None
        dh0 = torch.empty(batch, dim, dstate, **f32)
        grid = lambda meta: (triton_cdiv(dim, meta["BLOCK_D"]), batch)  # noqa: E731
        args = (
            u, delta, A, B, C, _dummy(D, u), _dummy(z, u), _dummy(delta_bias, u), states,
            dy.contiguous(), _dummy(dlast, dh0),
            du, ddelta, _dummy(dz, du), dA, dB, dC, _dummy(dD, dA), _dummy(dbias, dA), dh0,
        )
        strides = (B.stride(0), B.stride(1), B.stride(2), dB[0].numel())
        flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                     HAS_DLAST=dlast is not None, GROUPED=groups > 1, T=chunk, NSTATE=dstate,
                     NP=_carry_width(chunk, dstate), NPART=DB_PARTS)
        k.scan_bwd_kernel[grid](*args, dim, length, dim // groups, nchunks, *strides, REV=_reverse_mode(u.device),
                                **flags)
        dB, dC = dB.sum(0), dC.sum(0)
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
    """Same contract as ``selective_scan``; ``chunk_size`` (a power of two) sets the steps per tile (default:
    $KIT_TRITON_SCAN_T, else 512)."""
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if not u.is_cuda and not interpret_mode():
        raise KitError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); use impl='chunked' on CPU")
    length = u.shape[-1]
    default = int(os.environ.get(CHUNK_ENV, "0") or 0) or DEFAULT_CHUNK
    chunk = chunk_size or min(default, max(2, _next_pow2(length)))
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


def compile_ahead(
    arch: int = 90, act_dtype: str = "bf16", grouped: bool = False, chunk: int | None = None,
    shapes: list[tuple[int, int]] | None = None, rev: int = 1, only: str | None = None, probe: bool = True,
) -> dict:
    """Compile both kernels for an NVIDIA target without a GPU (triton ships ptxas), with every option
    on. Returns {kernel name: compiled kernel} at the default block shape, or {"name BLOCK_Dxwarps": ...} for each
    of ``shapes`` ((BLOCK_D, num_warps) pairs); raises on any compile error.

    Catches what the interpreter cannot (it runs kernels as Python): compile-time type and constexpr errors.
    ``rev`` is the backward's reverse-scan operand order (see _reverse_mode); ``only`` = "fwd" or "bwd" compiles one
    kernel; ``probe`` adds the reverse-scan probe kernel (default shapes, both kernels only).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpret_mode():
        raise KitError("compile_ahead needs TRITON_INTERPRET unset")
    k = _kernels()
    chunk = chunk or DEFAULT_CHUNK
    act = {"u_ptr", "dt_ptr", "z_ptr", "y_ptr", "B_ptr", "C_ptr", "dy_ptr", "du_ptr", "ddt_ptr", "dz_ptr"}
    flags = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "GROUPED": grouped, "T": chunk,
             "NSTATE": 16, "NP": _carry_width(chunk, 16)}
    if shapes is None:  # what KIT_TRITON_AUTOTUNE=0 runs
        quick = os.environ.get("KIT_TRITON_AUTOTUNE")
        os.environ["KIT_TRITON_AUTOTUNE"] = "0"
        try:
            default = {which: [(c.kwargs["BLOCK_D"], c.num_warps) for c in k._prune(k._configs(), {}, ept, T=chunk)]
                       for which, ept in (("fwd", k.FWD_EPT), ("bwd", k.BWD_EPT))}
        finally:
            if quick is None:
                os.environ.pop("KIT_TRITON_AUTOTUNE")
            else:
                os.environ["KIT_TRITON_AUTOTUNE"] = quick
    else:
        default = {"fwd": shapes, "bwd": shapes}
    out = {}
    for name, extra, which in (
        ("scan_fwd_kernel", {"HAS_H0": True, "STORE_STATES": True}, "fwd"),
        ("scan_bwd_kernel", {"HAS_DLAST": True, "REV": rev, "NPART": DB_PARTS}, "bwd"),
    ):
        if only and only != which:
            continue
        fn = getattr(k, name).fn  # the JITFunction under the autotuner
        for block_d, warps in default[which]:
            constexprs = {**flags, **extra, "BLOCK_D": block_d}
            signature = {}
            for arg in fn.arg_names:
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg.endswith("_ptr"):
                    signature[arg] = "*" + (act_dtype if arg in act else "fp32")
                else:
                    signature[arg] = "i32"
            # As the launcher specializes at the benchmark shape: every pointer and every size but nchunks
            # divisible by 16 (this decides vector widths and layouts).
            attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                     if signature[arg] != "constexpr" and arg != "nchunks"}
            src = ASTSource(fn, signature, constexprs, attrs)
            key = name if shapes is None else f"{name} {block_d}x{warps}"
            options = {"num_warps": warps, "num_stages": 1}
            out[key] = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    if shapes is None and only is None and probe:  # the probe _reverse_mode runs on the device
        fn = k.rev_probe_kernel
        src = ASTSource(fn, {"a_ptr": "*bf16", "c_ptr": "*bf16", "g_ptr": "*fp32", "R": "constexpr", "T": "constexpr",
                             "REV": "constexpr"}, {"R": 4, "T": 256, "REV": rev})
        out["rev_probe_kernel"] = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    return out


def resource_usage(compiled, arch: int = 90) -> dict:
    """Registers per thread and spill bytes of a compile_ahead kernel, from ptxas -v on its PTX (no GPU needed)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(arch)
    except TypeError:  # older triton: no arch argument
        tool = get_ptxas()
    ptxas = getattr(tool, "path", tool)
    target = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"])
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([ptxas, "-v", f"--gpu-name={target.group(1) if target else f'sm_{arch}'}", ptx,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill_st.group(1)) if spill_st else None,
            "spill_loads": int(spill_ld.group(1)) if spill_ld else None,
            "stack_frame": int(stack.group(1)) if stack else None,
            "shared": compiled.metadata.shared}
