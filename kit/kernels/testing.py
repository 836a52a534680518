"""Helpers to check a selective-scan implementation against the reference (used by tests and bench/gpu_check)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@dataclass(frozen=True)
class ScanCase:
    batch: int
    dim: int
    length: int
    dstate: int
    groups: int = 1
    D: bool = True
    z: bool = True
    delta_bias: bool = True
    softplus: bool = True
    initial_state: bool = True

    def __str__(self) -> str:
        flags = "".join(k[0] if getattr(self, k) else "-" for k in ("D", "z", "delta_bias", "softplus", "initial_state"))
        return f"b{self.batch}d{self.dim}l{self.length}n{self.dstate}g{self.groups}-{flags}"


def make_scan_inputs(case: ScanCase, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> dict:
    """Inputs shaped and scaled like a Mamba layer's (A = -[1..N] with jitter, small positive steps)."""
    gen = torch.Generator().manual_seed(seed)
    b, d, l, n, g = case.batch, case.dim, case.length, case.dstate, case.groups

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    A = -torch.arange(1, n + 1, dtype=torch.float64).repeat(d, 1) * (0.5 + torch.rand(d, n, generator=gen, dtype=torch.float64))
    if case.softplus:
        delta = rand(b, d, l, scale=0.5, shift=-3.0 if case.delta_bias else -2.0)
    else:
        delta = torch.rand(b, d, l, generator=gen, dtype=torch.float64) * 0.2 + 0.01
    bc_shape = (b, g, n, l) if g > 1 else (b, n, l)
    inputs = {
        "u": rand(b, d, l),
        "delta": delta,
        "A": A,
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
        "D": rand(d) if case.D else None,
        "z": rand(b, d, l) if case.z else None,
        "delta_bias": rand(d, scale=0.5, shift=1.0) if case.delta_bias else None,
        "initial_state": rand(b, d, n, scale=0.5) if case.initial_state else None,
    }
    out = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
            continue
        # A and the state stay fp32 in low-precision runs (as in a Mamba layer); activations take `dtype`.
        keep32 = k in ("A", "initial_state", "D", "delta_bias") and dtype in (torch.float16, torch.bfloat16)
        out[k] = v.to(device=device, dtype=torch.float32 if keep32 else dtype).requires_grad_(True)
    return out


def as_transposed_views(inputs: dict) -> dict:
    """The same values as non-contiguous views (time-major storage), as a Mamba block's transposes produce."""
    out = {}
    for k, v in inputs.items():
        if v is not None and v.dim() >= 3:
            v = v.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)
        out[k] = v
    return out


def run_scan(fn: Callable, inputs: dict, softplus: bool, seed: int = 1, **kwargs):
    """Run ``fn`` forward and backward with fixed random cotangents on y and the last state.

    Returns (y, last_state, {input name: gradient}).
    """
    y, last = fn(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"], z=inputs["z"],
        delta_bias=inputs["delta_bias"], delta_softplus=softplus, initial_state=inputs["initial_state"],
        return_last_state=True, **kwargs,
    )
    gen = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
    wh = torch.randn(last.shape, generator=gen).to(device=last.device, dtype=last.dtype)
    names = [k for k in INPUT_NAMES if inputs[k] is not None]
    grads = torch.autograd.grad((y * wy).float().sum() + (last * wh).float().sum(), [inputs[k] for k in names])
    return y.detach(), last.detach(), dict(zip(names, grads))


def max_scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in fp64), the figure the tolerance tables bound."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-12))


def check_against_reference(
    impl: Callable, case: ScanCase, dtype: torch.dtype, tolerances: tuple[float, float], device: str = "cpu",
    transposed: bool = False, **kwargs,
) -> None:
    """Assert ``impl`` matches the sequential reference on ``case``: y, the last state and every input gradient.

    ``tolerances`` = (outputs and last state, gradients), bounds on ``max_scaled_error``; ``transposed`` feeds
    ``impl`` non-contiguous views of the same values.
    """
    from kit.kernels.scan_reference import selective_scan_reference

    inputs = make_scan_inputs(case, dtype, device=device)
    y_ref, last_ref, g_ref = run_scan(selective_scan_reference, inputs, case.softplus)
    if transposed:
        inputs = as_transposed_views(inputs)
        assert not inputs["u"].is_contiguous()
    y, last, g = run_scan(impl, inputs, case.softplus, **kwargs)
    tol_out, tol_grad = tolerances
    assert y.dtype == dtype and y.shape == inputs["u"].shape, (y.dtype, y.shape)
    assert last.dtype == last_ref.dtype and last.shape == (case.batch, case.dim, case.dstate), (last.dtype, last.shape)
    assert max_scaled_error(y, y_ref) <= tol_out, f"y: scaled error {max_scaled_error(y, y_ref):.2e}"
    assert max_scaled_error(last, last_ref) <= tol_out, f"last state: {max_scaled_error(last, last_ref):.2e}"
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert g[name].dtype == inputs[name].dtype, name
        err = max_scaled_error(g[name], g_ref[name])
        assert err <= tol_grad, f"grad {name}: scaled error {err:.2e} > {tol_grad:.0e}"
