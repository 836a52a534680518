"""The fused CPU selective scan (C++ extension) against the sequential reference, and the dispatcher's use of it.

Skips when the extension cannot build here (no compiler or ninja); the first test pays the one-time compile.
"""

from __future__ import annotations

import pytest
import torch

from kit.kernels import resolve_impl, selective_scan
from kit.kernels.testing import ScanCase, make_scan_inputs
from kit.kernels.testing import check_against_reference as check_scan

torch.set_num_threads(1)


def _extension_or_skip():
    from kit.kernels.scan_cpu import extension_available

    if not extension_available():
        pytest.skip("the CPU selective-scan extension does not build here")
    from kit.kernels.scan_cpu import selective_scan_cpu

    return selective_scan_cpu


@pytest.fixture(scope="module")
def scan_cpu():
    return _extension_or_skip()


# Bound on max|impl - reference| / max|reference| per input dtype: (outputs and last state, input gradients).
# fp64 runs the same loops in fp64 with libm's exp; fp32 uses the kernel's polynomial exp (~2 ulp).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}

# The grid of tests/test_kernels.py, plus lengths around the kernel's 64-step chunk.
CASES = [
    ScanCase(2, 8, 1, 4),
    ScanCase(2, 8, 37, 4),
    ScanCase(2, 8, 37, 4, D=False, z=False, delta_bias=False, softplus=False, initial_state=False),
    ScanCase(1, 6, 64, 1, z=False, initial_state=False),
    ScanCase(2, 8, 50, 16, delta_bias=False),
    ScanCase(2, 8, 50, 16, D=False, softplus=False),
    ScanCase(2, 8, 29, 4, groups=2),
    ScanCase(1, 12, 33, 16, groups=3, z=False, D=False),
    ScanCase(2, 8, 65, 16),
    ScanCase(1, 4, 200, 16, groups=2),
]


def check_against_reference(impl, case: ScanCase, dtype: torch.dtype, **kwargs) -> None:
    check_scan(impl, case, dtype, TOLERANCES[dtype], **kwargs)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_matches_reference(scan_cpu, case, dtype):
    check_against_reference(scan_cpu, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[9]], ids=str)
def test_cpu_low_precision_inputs_accumulate_in_fp32(scan_cpu, case, dtype):
    check_against_reference(scan_cpu, case, dtype)


def test_cpu_takes_non_contiguous_inputs(scan_cpu):
    check_against_reference(scan_cpu, ScanCase(2, 8, 70, 4, groups=2), torch.float64, transposed=True)


@pytest.mark.parametrize("case", [ScanCase(3, 10, 90, 16, groups=2), ScanCase(1, 64, 90, 16)], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_is_the_same_with_more_threads(scan_cpu, threads, case):
    # dA/dD/delta_bias are summed from per-row partials, and with fewer (batch, group) rows than threads (the
    # second case) a row's channel blocks are split over threads and dB/dC summed from per-part buffers:
    # still within tolerance, and repeatable.
    torch.set_num_threads(threads)
    try:
        check_against_reference(scan_cpu, case, torch.float32)
        x = make_scan_inputs(case, torch.float32)
        runs = []
        for _ in range(2):
            y = scan_cpu(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
                         delta_softplus=True, initial_state=x["initial_state"])
            runs.append(torch.autograd.grad(y.square().sum(), [x["B"], x["A"]]))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.set_num_threads(1)


def test_cpu_two_halves_with_carried_state_equal_one_scan(scan_cpu):
    case = ScanCase(2, 8, 130, 16)
    x = {k: (v.detach() if v is not None else None) for k, v in make_scan_inputs(case, torch.float64).items()}
    kw = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True, impl="cpu")
    full, last = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], z=x["z"], initial_state=x["initial_state"], **kw)
    cut = 77
    parts, state = [], x["initial_state"]
    for sl in (slice(0, cut), slice(cut, None)):
        y, state = selective_scan(x["u"][..., sl], x["delta"][..., sl], x["A"], x["B"][..., sl], x["C"][..., sl],
                                  z=x["z"][..., sl], initial_state=state, **kw)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, -1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-12, atol=1e-12)


def test_cpu_is_stable_for_long_sequences_and_large_steps(scan_cpu):
    # Steps large enough that exp(delta A) underflows: the kernel's exp clamps instead of producing garbage.
    case = ScanCase(1, 4, 3000, 16, D=False, z=False, delta_bias=False, softplus=False, initial_state=False)
    x = make_scan_inputs(case, torch.float32)
    delta = (torch.rand(1, 4, 3000) * 50 + 1).requires_grad_(True)
    y = scan_cpu(x["u"], delta, x["A"], x["B"], x["C"])
    y_ref = selective_scan(x["u"], delta, x["A"], x["B"], x["C"], impl="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    assert all(torch.isfinite(x[k].grad).all() for k in ("u", "A", "B", "C")) and torch.isfinite(delta.grad).all()


def test_auto_picks_cpu_when_the_extension_builds(monkeypatch, scan_cpu):
    monkeypatch.delenv("KIT_SCAN_IMPL", raising=False)
    assert resolve_impl("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setenv("KIT_SCAN_IMPL", "chunked")
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"


def test_auto_falls_back_to_chunked_when_the_build_fails(monkeypatch):
    import kit.kernels.scan_cpu as scan_cpu_module
    from kit.errors import KitError

    monkeypatch.delenv("KIT_SCAN_IMPL", raising=False)
    monkeypatch.setattr(scan_cpu_module, "_EXT", None)
    monkeypatch.setattr(scan_cpu_module, "_BUILD_ERROR", None)

    def broken_build():
        raise RuntimeError("Error building extension 'kit_selective_scan_cpu'")

    monkeypatch.setattr(scan_cpu_module, "_build", broken_build)
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    u = torch.zeros(1, 2, 3)
    with pytest.raises(KitError, match="could not be built.*impl='chunked'"):
        selective_scan(u, u, torch.zeros(2, 1), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), impl="cpu")


def test_native_build_is_keyed_by_flags_and_cpu_features(monkeypatch):
    # A home directory shared between machines must never load a binary built for another CPU's instruction set.
    import kit.kernels.scan_cpu as scan_cpu_module

    monkeypatch.delenv(scan_cpu_module.PORTABLE_ENV, raising=False)
    monkeypatch.setattr(scan_cpu_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(scan_cpu_module, "cpu_features", lambda: "sse2 avx avx2 fma avx512f")
    name_a, flags = scan_cpu_module.build_config()
    assert "-march=native" in flags and "-ffp-contract=fast" in flags
    monkeypatch.setattr(scan_cpu_module, "cpu_features", lambda: "sse2 avx avx2 fma")
    name_b, _ = scan_cpu_module.build_config()
    assert name_a != name_b and name_a.startswith("kit_selective_scan_cpu_native_")
    monkeypatch.setenv(scan_cpu_module.PORTABLE_ENV, "1")
    name_p, flags_p = scan_cpu_module.build_config()
    assert name_p == "kit_selective_scan_cpu_portable" and not any("native" in f for f in flags_p)


def test_build_info_names_the_instruction_set(scan_cpu):
    from kit.kernels.scan_cpu import build_info

    info = build_info()
    assert info["vector_bytes"] in (16, 32, 64) and info["isa"] and info["name"].startswith("kit_selective_scan_cpu_")


@pytest.mark.parametrize("silu", [True, False])
def test_cpu_causal_conv1d_matches_pytorch_with_gradients(scan_cpu, silu, monkeypatch):
    # The fused time-major conv (picked with the cpu scan) against F.conv1d (picked with KIT_SCAN_IMPL=chunked):
    # outputs and the gradients of x (a strided view, as in the Mamba block), weight and bias; 70 rows = 2 tiles.
    import kit.kernels.conv1d as conv_module

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 70, 2 * 21, generator=gen, dtype=torch.float64)[..., :21].transpose(1, 2).requires_grad_(True)
    weight = torch.randn(21, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(21, generator=gen, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(3, 21, 70, generator=gen, dtype=torch.float64)
    results = []
    for impl in ("cpu", "chunked"):
        monkeypatch.setenv("KIT_SCAN_IMPL", impl)
        assert conv_module._fused_cpu(x) == (impl == "cpu")
        out = conv_module.causal_conv1d(x, weight, bias, activation="silu" if silu else None)
        results.append((out, *torch.autograd.grad(out, [x, weight, bias], cot)))
    for fused, ref in zip(*results):
        torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_mixer_step_matches_the_pytorch_step(scan_cpu, dtype):
    # MambaMixer.step on CPU in inference runs two fused kernels; its PyTorch path is the reference. Channels (21)
    # and states (5) that fill no SIMD vector exercise the partial lanes; a row's result is the same alone.
    from kit.kernels.scan_cpu import mixer_step_cpu
    from kit.models.mamba import MambaMixer, MambaSpec

    torch.manual_seed(4)
    spec = MambaSpec(hidden_size=11, state_size=5, time_step_rank=3, expand=2, use_conv_bias=True)
    mixer = MambaMixer(spec).to(dtype).eval()
    dim = spec.intermediate_size
    with torch.no_grad():
        mixer.A_log.add_(torch.randn_like(mixer.A_log) * 0.3)
        mixer.D.normal_()
        hidden = torch.randn(9, 11, dtype=dtype)
        conv_state = torch.randn(9, dim, spec.conv_kernel - 1, dtype=dtype)
        ssm_state = torch.randn(9, dim, 5, dtype=dtype)
        assert mixer._fused_step(hidden) == (dtype == torch.float32)
        xz = mixer.in_proj(hidden)
        fused = mixer.out_proj(mixer_step_cpu(xz, conv_state, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, mixer.x_proj,
                                              mixer.dt_proj, -torch.exp(mixer.A_log), mixer.D, ssm_state,
                                              spec.time_step_rank))
        mixer.scan_impl = "chunked"  # not the cpu scan: the PyTorch step
        assert not mixer._fused_step(hidden)
        reference = mixer.step(hidden, conv_state, ssm_state)
        # The PyTorch step reads the SSM part in fp32 whatever the model's dtype: fp32 tolerances for both.
        torch.testing.assert_close(fused, reference, rtol=2e-5, atol=2e-5)
        alone = mixer_step_cpu(xz[3:4], conv_state[3:4], mixer.conv1d.weight[:, 0], mixer.conv1d.bias, mixer.x_proj,
                               mixer.dt_proj, -torch.exp(mixer.A_log), mixer.D, ssm_state[3:4], spec.time_step_rank)
        together = mixer_step_cpu(xz, conv_state, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, mixer.x_proj,
                                  mixer.dt_proj, -torch.exp(mixer.A_log), mixer.D, ssm_state, spec.time_step_rank)
    # x_proj/dt_proj are GEMMs whose bits may follow the row count; the kernels' own part is per row.
    torch.testing.assert_close(alone[0], together[3], rtol=1e-6, atol=1e-6)
