"""kit.kernels on CPU: the chunked scan against the sequential reference, conv1d, the dispatcher.

The triton implementation has its own module (test_kernels_triton.py) because it runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kit.errors import KitError
from kit.kernels import causal_conv1d, resolve_impl, selective_scan
from kit.kernels.scan_chunked import selective_scan_chunked
from kit.kernels.testing import ScanCase, make_scan_inputs
from kit.kernels.testing import check_against_reference as check_scan

torch.set_num_threads(1)

# Bound on max|impl - reference| / max|reference|, per input dtype: (outputs and last state, input gradients).
# Both sides accumulate in fp32 from the same rounded inputs, so low-precision error is mostly output rounding.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}

# (case, chunk size): L=1, L not a multiple of the chunk, N in {1, 4, 16}, grouped B/C, flags on and off.
CASES = [
    (ScanCase(2, 8, 1, 4), 4),
    (ScanCase(2, 8, 37, 4), 8),
    (ScanCase(2, 8, 37, 4, D=False, z=False, delta_bias=False, softplus=False, initial_state=False), 8),
    (ScanCase(1, 6, 64, 1, z=False, initial_state=False), 16),
    (ScanCase(2, 8, 50, 16, delta_bias=False), 16),
    (ScanCase(2, 8, 50, 16, D=False, softplus=False), 7),
    (ScanCase(2, 8, 29, 4, groups=2), 8),
    (ScanCase(1, 12, 33, 16, groups=3, z=False, D=False), 5),
    (ScanCase(2, 8, 40, 4), None),  # automatic chunk size
]


def check_against_reference(impl, case: ScanCase, dtype: torch.dtype, **kwargs) -> None:
    check_scan(impl, case, dtype, TOLERANCES[dtype], **kwargs)


@pytest.mark.parametrize("case,chunk", CASES, ids=[f"{c}-T{t}" for c, t in CASES])
def test_chunked_matches_reference_fp64(case, chunk):
    check_against_reference(selective_scan_chunked, case, torch.float64, chunk_size=chunk)


def test_chunked_takes_non_contiguous_inputs():
    check_against_reference(selective_scan_chunked, ScanCase(2, 8, 37, 4, groups=2), torch.float64, chunk_size=8,
                            transposed=True)


def test_chunked_without_the_decay_table_matches_reference(monkeypatch):
    # Above DECAY_TABLE_MAX_BYTES the decays are recomputed per step instead of tabulated once.
    import kit.kernels.scan_chunked as scan_chunked

    monkeypatch.setattr(scan_chunked, "DECAY_TABLE_MAX_BYTES", 0)
    check_against_reference(selective_scan_chunked, ScanCase(2, 8, 37, 4, groups=2), torch.float64, chunk_size=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case,chunk", [CASES[1], CASES[6]], ids=["l37", "grouped"])
def test_chunked_matches_reference_per_dtype(case, chunk, dtype):
    check_against_reference(selective_scan_chunked, case, dtype, chunk_size=chunk)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_two_halves_with_carried_state_equal_one_scan(impl):
    case = ScanCase(2, 8, 45, 16)
    x = {k: (v.detach() if v is not None else None) for k, v in make_scan_inputs(case, torch.float64).items()}
    kw = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True, impl=impl)
    full, last = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], z=x["z"], initial_state=x["initial_state"], **kw)
    cut = 19
    parts, state = [], x["initial_state"]
    for sl in (slice(0, cut), slice(cut, None)):
        y, state = selective_scan(x["u"][..., sl], x["delta"][..., sl], x["A"], x["B"][..., sl], x["C"][..., sl],
                                  z=x["z"][..., sl], initial_state=state, **kw)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, -1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-12, atol=1e-12)


def test_chunked_is_stable_for_long_sequences_and_large_steps():
    # Large steps and strong decay: a cumulative-sum formulation would overflow exp() here.
    case = ScanCase(1, 4, 3000, 16, D=False, z=False, delta_bias=False, softplus=False, initial_state=False)
    x = make_scan_inputs(case, torch.float32)
    delta = (torch.rand(1, 4, 3000) * 5 + 1).requires_grad_(True)
    x["delta"] = delta
    y = selective_scan_chunked(x["u"], delta, x["A"], x["B"], x["C"], chunk_size=512)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert all(torch.isfinite(x[k].grad).all() for k in ("u", "A", "B", "C")) and torch.isfinite(delta.grad).all()


def test_reference_matches_a_hand_computed_scan():
    # One channel, one state, three steps: h = e^{-1} h + u, y = h (delta = 1, A = -1, B = C = 1).
    u = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    ones = torch.ones(1, 1, 3, dtype=torch.float64)
    y = selective_scan(u, ones, -torch.ones(1, 1, dtype=torch.float64), ones, ones, impl="reference")
    e = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    expected = torch.stack([1.0 + 0 * e, 2 + e, 3 + e * (2 + e)])
    torch.testing.assert_close(y.flatten(), expected)


def test_shape_errors_are_clear():
    case = ScanCase(1, 4, 8, 2)
    x = {k: (v.detach() if v is not None else None) for k, v in make_scan_inputs(case).items()}
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(x["u"], x["delta"], x["A"][:2], x["B"], x["C"])
    with pytest.raises(ValueError, match="not divisible by groups"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"].unsqueeze(1).expand(1, 3, 2, 8), x["C"].unsqueeze(1).expand(1, 3, 2, 8))


# --- dispatcher ---------------------------------------------------------------------------------------------

def test_auto_picks_chunked_on_cpu_without_the_extension(monkeypatch):
    # With the C++ extension built, auto takes "cpu" (tests/test_kernels_cpu.py); chunked is the fallback.
    import kit.kernels.dispatch as dispatch

    monkeypatch.delenv("KIT_SCAN_IMPL", raising=False)
    monkeypatch.setattr(dispatch, "cpu_extension_available", lambda: False)
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"


def test_env_var_forces_an_impl(monkeypatch):
    monkeypatch.setenv("KIT_SCAN_IMPL", "reference")
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    assert resolve_impl("chunked", torch.device("cpu")) == "chunked"  # an explicit choice wins
    monkeypatch.setenv("KIT_SCAN_IMPL", "fast")
    with pytest.raises(KitError, match="KIT_SCAN_IMPL='fast'.*reference, chunked, triton, mamba_ssm"):
        resolve_impl("auto", torch.device("cpu"))


def test_unknown_impl_lists_the_options():
    u = torch.zeros(1, 2, 3)
    with pytest.raises(KitError, match="unknown selective-scan implementation 'cuda'.*auto, reference, chunked, triton, mamba_ssm"):
        selective_scan(u, u, torch.zeros(2, 1), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), impl="cuda")


def test_triton_on_cpu_tensors_says_what_to_use(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    u = torch.zeros(1, 2, 3)
    with pytest.raises(KitError, match="needs CUDA tensors"):
        selective_scan(u, u, torch.zeros(2, 1), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), impl="triton")


def test_mamba_ssm_missing_is_a_clear_error():
    try:
        import mamba_ssm  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("mamba_ssm is installed here")
    u = torch.zeros(1, 2, 3)
    with pytest.raises(KitError, match="mamba_ssm"):
        selective_scan(u, u, torch.zeros(2, 1), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), impl="mamba_ssm")


def test_kernels_import_without_data_stack_or_triton():
    # The GPU machine has torch and triton but not polars/pydantic/orjson/fhir.resources; triton loads lazily.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'polars', 'pydantic', 'orjson', 'fhir', 'triton', 'mamba_ssm'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, kit.kernels as K\n"
        "u = torch.randn(1, 4, 9)\n"
        "y = K.selective_scan(u, u.abs(), -torch.ones(4, 2), torch.randn(1, 2, 9), torch.randn(1, 2, 9))\n"
        "K.causal_conv1d(u, torch.randn(4, 3), activation='silu')\n"
        "print('ok', tuple(y.shape))\n"
    )
    # chunked: with a cold extension cache, auto would compile the C++ scan (minutes) inside this timeout.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KIT_SCAN_IMPL": "chunked"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok (1, 4, 9)" in out.stdout


# --- causal conv1d ------------------------------------------------------------------------------------------

def _conv_loop(x, weight, bias, silu):
    b, d, l = x.shape
    w = weight.shape[1]
    out = torch.zeros_like(x)
    for t in range(l):
        for k in range(w):
            src = t - (w - 1) + k
            if src >= 0:
                out[..., t] += weight[:, k] * x[..., src]
    if bias is not None:
        out += bias[:, None]
    return F.silu(out) if silu else out


@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv1d_matches_the_definition(silu):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    out = causal_conv1d(x, weight, bias, activation="silu" if silu else None)
    torch.testing.assert_close(out, _conv_loop(x, weight, bias, silu))


def test_causal_conv1d_streams_with_carried_state():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 20, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    full = causal_conv1d(x, weight, activation="silu")
    first, state = causal_conv1d(x[..., :7], weight, activation="silu", return_final_state=True)
    second, _ = causal_conv1d(x[..., 7:], weight, activation="silu", initial_state=state, return_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], -1), full)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="relu")
