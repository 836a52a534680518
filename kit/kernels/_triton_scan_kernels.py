"""Triton kernels behind ``scan_triton``. Loaded lazily, once per interpreter mode (see scan_triton._kernels).

Layout: one program per (block of BLOCK_D channels, batch row), walking the sequence in chunks of T steps.
Each chunk is a (BLOCK_D, N, T) tile (time last, so loads of u/delta/z/y are coalesced and the scan runs along
the fastest axis) scanned in parallel with an associative scan over the affine maps h -> a h + x; the state
between chunks stays in registers. The forward writes y, the last state and (for the backward) the state at
each chunk start. The backward walks the chunks right to left, recomputes the chunk's states from its saved
start state, and gets the adjoint from a second forward scan over time-reversed loads, flipped back in
registers (not ``reverse=True``, whose operand order for non-commutative combines has varied between Triton
releases), so no (B, D, L, N) tensor ever reaches memory.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton import knobs

LOG2E = tl.constexpr(1.4426950408889634)  # a global a kernel reads must be a constexpr


# (channels per program, warps). A (BLOCK_D, 16, 64) tile per live tensor: at 8-16 tile elements per thread the
# sm_90 build (ptxas -v on this code) keeps the forward at 122-168 registers without spills and the backward at
# 223-255 registers with no or small (16-48 byte) spills; 32 elements per thread spill 600-900 bytes in the backward.
FWD_SHAPES = [(1, 4), (2, 4), (2, 8), (4, 8), (4, 4)]
BWD_SHAPES = [(1, 4), (2, 8), (2, 4), (4, 8)]


def _configs(shapes: list[tuple[int, int]]) -> list[triton.Config]:
    """Block shapes to autotune over on the GPU. KIT_TRITON_AUTOTUNE=0 uses the second (quick compiles for tests)."""
    if knobs.runtime.interpret:
        return [triton.Config({"BLOCK_D": 4}, num_warps=1)]
    if os.environ.get("KIT_TRITON_AUTOTUNE", "1") == "0":
        shapes = shapes[1:2]
    return [triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=1) for bd, w in shapes]


@triton.jit
def _affine(a1, x1, a2, x2):
    # Compose h -> a1 h + x1 then h -> a2 h + x2.
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _scan_affine_tl(a, x):
    return tl.associative_scan((a, x), 2, _affine)


@triton.jit
def _sum_tl(x, AXIS: tl.constexpr):
    return tl.sum(x, axis=AXIS)


@triton.jit
def _flip_tl(x):
    return tl.flip(x, 2)


# Interpreter stand-ins. tl.sum/tl.flip/tl.zeros/tl.sigmoid are @triton.jit helpers decorated when triton
# was imported, so they fail in interpreter mode switched on after that import (as the tests do); and the
# interpreter runs a Python call per element for a custom associative scan, which took minutes at test shapes.
def _wrap(data, like):
    from triton.runtime.interpreter import ReduceScanOpInterface

    return ReduceScanOpInterface(0, None).to_tensor(data, like.dtype)


def _scan_affine_numpy(a, x):
    import numpy as np

    ad, xd = a.handle.data, x.handle.data
    acum, h = np.empty_like(ad), np.empty_like(xd)
    acum[..., 0], h[..., 0] = ad[..., 0], xd[..., 0]
    for t in range(1, ad.shape[-1]):
        acum[..., t] = acum[..., t - 1] * ad[..., t]
        h[..., t] = ad[..., t] * h[..., t - 1] + xd[..., t]
    return _wrap(acum, a), _wrap(h, x)


def _sum_numpy(x, AXIS):
    import numpy as np

    return _wrap(np.sum(x.handle.data, axis=AXIS), x)


def _flip_numpy(x):
    import numpy as np

    return _wrap(np.ascontiguousarray(x.handle.data[..., ::-1]), x)


# KIT_TRITON_NATIVE_SCAN=1 keeps Triton's own scan/flip/sum under the interpreter (slow; one small test uses it).
if knobs.runtime.interpret and os.environ.get("KIT_TRITON_NATIVE_SCAN", "0") != "1":
    scan_affine, tl_sum, flip_time = _scan_affine_numpy, _sum_numpy, _flip_numpy
else:
    scan_affine, tl_sum, flip_time = _scan_affine_tl, _sum_tl, _flip_tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_steps(ptr, row, t, mask, HAS_BIAS: tl.constexpr, bias, SOFTPLUS: tl.constexpr):
    """delta at steps t (BLOCK_D, T) after bias and softplus; 0 where masked, so padded steps change nothing."""
    dt = tl.load(ptr + row[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += bias[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask, dt, 0.0)


@triton.autotune(configs=_configs(FWD_SHAPES), key=["dim", "length", "dstate", "T"])
@triton.jit
def scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, states_ptr, last_ptr,
    dim, length, dstate, hdim, nchunks,
    s_bb, s_bg, s_bn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_STATES: tl.constexpr, GROUPED: tl.constexpr,
    T: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    offs_t = tl.arange(0, T)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.full((BLOCK_D,), 0.0, tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    row = (pid_b * dim + offs_d).to(tl.int64) * length
    st = (pid_b * dim + offs_d).to(tl.int64)[:, None] * dstate + offs_n[None, :]
    st_chunks = (pid_b * dim + offs_d).to(tl.int64)[:, None] * (nchunks * dstate) + offs_n[None, :]
    if GROUPED:
        bc = pid_b * s_bb + (offs_d // hdim)[:, None, None] * s_bg + offs_n[None, :, None] * s_bn
    else:
        bc = pid_b * s_bb + offs_n[:, None] * s_bn
    if HAS_H0:
        h = tl.load(h0_ptr + st, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.full((BLOCK_D, NP), 0.0, tl.float32)
    for c in range(nchunks):
        t = c * T + offs_t
        mask_t = t < length
        m2 = mask_d[:, None] & mask_t[None, :]
        if STORE_STATES:
            tl.store(states_ptr + st_chunks + c * dstate, h, mask=mask_dn)
        dt = _load_steps(dt_ptr, row, t, m2, HAS_BIAS, bias, SOFTPLUS)
        u = tl.load(u_ptr + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
        if GROUPED:
            m3 = mask_d[:, None, None] & mask_n[None, :, None] & mask_t[None, None, :]
            Bt = tl.load(B_ptr + bc + t[None, None, :], mask=m3, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc + t[None, None, :], mask=m3, other=0.0).to(tl.float32)
        else:
            m3 = mask_n[:, None] & mask_t[None, :]
            Bt = tl.load(B_ptr + bc + t[None, :], mask=m3, other=0.0).to(tl.float32)[None, :, :]
            Ct = tl.load(C_ptr + bc + t[None, :], mask=m3, other=0.0).to(tl.float32)[None, :, :]
        a = tl.exp2(dt[:, None, :] * A[:, :, None])
        x = (dt * u)[:, None, :] * Bt
        acum, hloc = scan_affine(a, x)
        hs = hloc + acum * h[:, :, None]
        y = tl_sum(hs * Ct, 1)
        if HAS_D:
            y += u * Dv[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
            y = y * z * _sigmoid(z)
        tl.store(y_ptr + row[:, None] + t[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)
        h = tl_sum(tl.where(offs_t[None, None, :] == T - 1, hs, 0.0), 2)
    tl.store(last_ptr + st, h, mask=mask_dn)


@triton.jit
def _gated_dy(dy_ptr, z_ptr, row, t, mask, HAS_Z: tl.constexpr):
    """dL/d(core y) at steps t: the incoming gradient times silu(z)."""
    dy = tl.load(dy_ptr + row[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = dy * z * _sigmoid(z)
    return dy


@triton.autotune(configs=_configs(BWD_SHAPES), key=["dim", "length", "dstate", "T"], reset_to_zero=["dB_ptr", "dC_ptr"])
@triton.jit
def scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dy_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, length, dstate, hdim, nchunks,
    s_bb, s_bg, s_bn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, GROUPED: tl.constexpr,
    T: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    offs_t = tl.arange(0, T)
    rev_t = T - 1 - offs_t
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A_nat = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A = A_nat * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.full((BLOCK_D,), 0.0, tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    row = (pid_b * dim + offs_d).to(tl.int64) * length
    st = (pid_b * dim + offs_d).to(tl.int64)[:, None] * dstate + offs_n[None, :]
    st_chunks = (pid_b * dim + offs_d).to(tl.int64)[:, None] * (nchunks * dstate) + offs_n[None, :]
    if GROUPED:
        bc = pid_b * s_bb + (offs_d // hdim)[:, None, None] * s_bg + offs_n[None, :, None] * s_bn
    else:
        bc = pid_b * s_bb + offs_n[:, None] * s_bn
    if HAS_DLAST:
        g = tl.load(dlast_ptr + st, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        g = tl.full((BLOCK_D, NP), 0.0, tl.float32)
    dA_acc = tl.full((BLOCK_D, NP), 0.0, tl.float32)
    dD_acc = tl.full((BLOCK_D,), 0.0, tl.float32)
    dbias_acc = tl.full((BLOCK_D,), 0.0, tl.float32)
    for ci in range(nchunks):
        c = nchunks - 1 - ci
        t = c * T + offs_t
        mask_t = t < length
        m2 = mask_d[:, None] & mask_t[None, :]
        if GROUPED:
            m3 = mask_d[:, None, None] & mask_n[None, :, None] & mask_t[None, None, :]
            Bt = tl.load(B_ptr + bc + t[None, None, :], mask=m3, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc + t[None, None, :], mask=m3, other=0.0).to(tl.float32)
        else:
            m3 = mask_n[:, None] & mask_t[None, :]
            Bt = tl.load(B_ptr + bc + t[None, :], mask=m3, other=0.0).to(tl.float32)[None, :, :]
            Ct = tl.load(C_ptr + bc + t[None, :], mask=m3, other=0.0).to(tl.float32)[None, :, :]
        # Recompute this chunk's states from its saved start state.
        dt_pre = tl.load(dt_ptr + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32) + bias[:, None]
        dt = _load_steps(dt_ptr, row, t, m2, HAS_BIAS, bias, SOFTPLUS)
        u = tl.load(u_ptr + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
        h_start = tl.load(states_ptr + st_chunks + c * dstate, mask=mask_dn, other=0.0)
        a = tl.exp2(dt[:, None, :] * A[:, :, None])
        dtu = dt * u
        x = dtu[:, None, :] * Bt
        acum, hloc = scan_affine(a, x)
        hs = hloc + acum * h_start[:, :, None]
        # Adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}, as a forward scan over the chunk read back to front; the
        # adjoint from later chunks enters at the chunk's last step.
        tr = c * T + rev_t
        mask_r = mask_d[:, None] & (tr < length)[None, :]
        mask_rn = mask_d[:, None] & ((offs_t >= 1) & (tr + 1 < length))[None, :]
        an_r = tl.exp2(_load_steps(dt_ptr, row, tr + 1, mask_rn, HAS_BIAS, bias, SOFTPLUS)[:, None, :] * A[:, :, None])
        dyc_r = _gated_dy(dy_ptr, z_ptr, row, tr, mask_r, HAS_Z)
        if GROUPED:
            m3r = mask_d[:, None, None] & mask_n[None, :, None] & (tr < length)[None, None, :]
            Cr = tl.load(C_ptr + bc + tr[None, None, :], mask=m3r, other=0.0).to(tl.float32)
        else:
            m3r = mask_n[:, None] & (tr < length)[None, :]
            Cr = tl.load(C_ptr + bc + tr[None, :], mask=m3r, other=0.0).to(tl.float32)[None, :, :]
        cvec_r = dyc_r[:, None, :] * Cr + tl.where(offs_t[None, None, :] == 0, g[:, :, None], 0.0)
        _, gs_r = scan_affine(an_r, cvec_r)
        gs = flip_time(gs_r)  # dL/dh_t in time order
        # Output epilogue y = (C.h + D u) * silu(z): gradients for z, D and the gated dy.
        dy = tl.load(dy_ptr + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + row[:, None] + t[None, :], mask=m2, other=0.0).to(tl.float32)
            sz = _sigmoid(z)
            y_core = tl_sum(hs * Ct, 1)
            if HAS_D:
                y_core += u * Dv[:, None]
            dz = dy * y_core * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + row[:, None] + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dy * z * sz
        du = dy * 0.0
        if HAS_D:
            dD_acc += tl_sum(dy * u, 1)
            du += dy * Dv[:, None]
        ddtu = tl_sum(gs * Bt, 1)
        s = gs * (hs - x)  # dL/d(dt A) = g_t a_t h_{t-1}
        ddt = tl_sum(s * A_nat[:, :, None], 1) + ddtu * u
        dA_acc += tl_sum(s * dt[:, None, :], 2)
        du += ddtu * dt
        if SOFTPLUS:
            ddt = ddt * _sigmoid(dt_pre)
        ddt = tl.where(m2, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += tl_sum(ddt, 1)
        tl.store(du_ptr + row[:, None] + t[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + row[:, None] + t[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
        dBv = gs * dtu[:, None, :]
        dCv = hs * dy[:, None, :]
        if GROUPED:
            tl.atomic_add(dB_ptr + bc + t[None, None, :], dBv, mask=m3, sem="relaxed")
            tl.atomic_add(dC_ptr + bc + t[None, None, :], dCv, mask=m3, sem="relaxed")
        else:
            tl.atomic_add(dB_ptr + bc + t[None, :], tl_sum(dBv, 0), mask=m3, sem="relaxed")
            tl.atomic_add(dC_ptr + bc + t[None, :], tl_sum(dCv, 0), mask=m3, sem="relaxed")
        g = tl_sum(tl.where(offs_t[None, None, :] == 0, a * gs, 0.0), 2)
    tl.store(dA_ptr + st, dA_acc, mask=mask_dn)
    tl.store(dh0_ptr + st, g, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)
