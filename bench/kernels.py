"""Selective-scan kernels: speed and memory of each implementation at the issue's shapes, checked in the same run.

CPU section (always): the sequential `reference` vs the `chunked` PyTorch scan and the fused C++ `cpu` scan (when
its extension builds) at B=2, D=256, L=2048, N=16, fp32, forward and forward+backward (bar: the CPU default's
fwd+bwd >= 10x faster than reference). Wall-clock medians plus the process CPU time, because the 2-core machines
this runs on are often shared.
GPU section (only with CUDA): `triton` vs the chunked PyTorch scan on the GPU (the reference-free torch baseline;
the sequential loop is timed once, forward only) and vs mamba-ssm's CUDA kernel when installed, at B=8, D=1536,
L=2048, N=16, bf16 with z, D, delta_bias and softplus; forward and forward+backward, peak memory. The Triton
scan is timed at each chunk length in --chunks (block shapes autotuned), each checked against the reference (y,
last state and every input gradient); the fastest forward+backward is reported as "best" (its chunk is what
bench/gpu_check.sh hands the backbone benchmark). Bars: triton forward <= 0.20 ms and forward+backward <= 0.60 ms
(best chunk); our time / mamba-ssm's reported when it is there.

Examples:
    python bench/kernels.py                    # CPU section (and GPU when CUDA is present)
    python bench/kernels.py --threads 1        # CPU with one torch thread
    python bench/kernels.py --out /tmp/k.json  # write the JSON elsewhere
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "kernels.json"
CPU_SHAPE = {"batch": 2, "dim": 256, "length": 2048, "dstate": 16}
GPU_SHAPE = {"batch": 8, "dim": 1536, "length": 2048, "dstate": 16}
CPU_SPEEDUP_BAR = 10.0
GPU_FWD_BAR_MS, GPU_FWDBWD_BAR_MS = 0.20, 0.60

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)
console = Console(width=max(120, Console().width))


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def make_inputs(shape: dict[str, int], dtype, device: str, grad: bool) -> dict:
    """Mamba-like inputs: A = -[1..N] per channel, softplus(delta + bias) steps, gate z, skip D."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    b, d, l, n = shape["batch"], shape["dim"], shape["length"], shape["dstate"]

    def randn(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s, generator=gen, device=device) * scale + shift).to(dt).requires_grad_(grad)

    f32 = torch.float32
    return {
        "u": randn(b, d, l), "delta": randn(b, d, l, scale=0.5, shift=-1.0), "z": randn(b, d, l),
        "B": randn(b, n, l), "C": randn(b, n, l),
        "A": (-torch.arange(1, n + 1, device=device, dtype=f32).repeat(d, 1)).requires_grad_(grad),
        "D": randn(d, dt=f32), "delta_bias": randn(d, scale=0.5, shift=-2.0, dt=f32),
    }


def scan_call(impl: str, x: dict) -> Callable[[], Any]:
    """impl: a dispatcher name, or "triton-T512" (the Triton scan at a chunk length)."""
    from functools import partial

    from kit.kernels import selective_scan

    if impl.startswith("triton-"):
        from kit.kernels.scan_triton import selective_scan_triton

        fn = partial(selective_scan_triton, **triton_options(impl))
    else:
        fn = partial(selective_scan, impl=impl)

    def call():
        return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                  delta_bias=x["delta_bias"], delta_softplus=True)
    return call


def triton_options(impl: str) -> dict:
    """"triton-T512" -> {"chunk_size": 512}."""
    return {"chunk_size": int(impl.split("-")[1].lstrip("T"))}


def time_cpu(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_s": statistics.median(wall), "wall_min_s": min(wall), "cpu_s": statistics.median(cpu)}


def fwd_bwd(call: Callable[[], Any], x: dict) -> Callable[[], Any]:
    grads = [v for v in x.values() if v.requires_grad]

    def run():
        y = call()
        y.backward(torch_ones_like(y))
        for v in grads:
            v.grad = None
    return run


def torch_ones_like(y):
    import torch

    return torch.ones_like(y)


def cpu_section(threads: int, repeats: int) -> dict[str, Any]:
    import torch

    from kit.kernels.testing import max_scaled_error

    torch.set_num_threads(threads)
    x = make_inputs(CPU_SHAPE, torch.float32, "cpu", grad=True)
    rows = []
    outs = {}
    from kit.kernels.dispatch import cpu_extension_available

    impls = ["reference", "chunked"] + (["cpu"] if cpu_extension_available() else [])
    for impl in impls:
        call = scan_call(impl, x)
        call()  # warm-up (and, for cpu, the extension load) outside the timings
        with torch.no_grad():
            fwd = time_cpu(call, repeats)
        both = time_cpu(fwd_bwd(call, x), max(1, repeats if impl != "reference" else repeats // 2))
        outs[impl] = call().detach()
        rows.append({"impl": impl, "fwd": fwd, "fwd_bwd": both})
    ref, ch = rows[0], rows[1]
    best = rows[-1]  # the CPU default: cpu when it builds, else chunked
    result = {
        "shape": CPU_SHAPE, "dtype": "fp32", "threads": threads, "rows": rows, "default": best["impl"],
        "max_scaled_error_chunked_vs_reference": max_scaled_error(outs["chunked"], outs["reference"]),
        "speedup_fwd": ref["fwd"]["wall_s"] / ch["fwd"]["wall_s"],
        "speedup_fwd_bwd": ref["fwd_bwd"]["wall_s"] / ch["fwd_bwd"]["wall_s"],
        "speedup_fwd_bwd_cpu_time": ref["fwd_bwd"]["cpu_s"] / ch["fwd_bwd"]["cpu_s"],
    }
    if "cpu" in outs:
        result["max_scaled_error_cpu_vs_reference"] = max_scaled_error(outs["cpu"], outs["reference"])
        result["speedup_fwd_cpu"] = ref["fwd"]["wall_s"] / best["fwd"]["wall_s"]
        result["speedup_fwd_bwd_cpu"] = ref["fwd_bwd"]["wall_s"] / best["fwd_bwd"]["wall_s"]
        result["speedup_fwd_bwd_cpu_cpu_time"] = ref["fwd_bwd"]["cpu_s"] / best["fwd_bwd"]["cpu_s"]
    value = ref["fwd_bwd"]["wall_s"] / best["fwd_bwd"]["wall_s"]
    result["bar"] = {"bar": f"{best['impl']} fwd+bwd >= {CPU_SPEEDUP_BAR:.0f}x reference (CPU)",
                     "value": f"{value:.1f}x", "pass": value >= CPU_SPEEDUP_BAR}
    return result


def time_cuda(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    import torch

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return {"ms": statistics.median(ms), "ms_min": min(ms), "peak_mem_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}


def gpu_section(repeats: int, chunks: list[int]) -> dict[str, Any]:
    import torch

    from kit.kernels.testing import max_scaled_error

    x = make_inputs(GPU_SHAPE, torch.bfloat16, "cuda", grad=True)
    tritons = [f"triton-T{c}" for c in chunks]
    impls = tritons + ["chunked"]
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401

        impls.append("mamba_ssm")
    except Exception as err:  # noqa: BLE001 - any failure means "not available here"
        console.print(f"mamba_ssm not available: {err}")
    rows, outs = [], {}
    for impl in impls:
        call = scan_call(impl, x)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                fwd = time_cuda(call, repeats)
            both = time_cuda(fwd_bwd(call, x), repeats)
            with torch.no_grad():
                outs[impl] = call().float()
        except Exception as err:  # noqa: BLE001 - report and carry on with the other implementations
            rows.append({"impl": impl, "error": f"{type(err).__name__}: {err}"[:300]})
            console.print(f"{impl}: [red]{type(err).__name__}: {err}"[:400])
            continue
        rows.append({"impl": impl, "fwd": fwd, "fwd_bwd": both, "wall_s_incl_compile": time.perf_counter() - start,
                     **({"configs": tuned_configs(impl)} if impl.startswith("triton-") else {})})
        console.print(f"{impl}: fwd {fwd['ms']:.3f} ms, fwd+bwd {both['ms']:.3f} ms "
                      f"({time.perf_counter() - start:.0f} s with compiles) {rows[-1].get('configs', '')}")
    with torch.no_grad():  # the sequential loop, once, forward only: the oracle and a sense of scale
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs["reference"] = scan_call("reference", x)().float()
        torch.cuda.synchronize()
        rows.append({"impl": "reference", "fwd": {"ms": (time.perf_counter() - t) * 1e3}, "fwd_bwd": None})
    errors = {k: max_scaled_error(v, outs["reference"]) for k, v in outs.items() if k != "reference"}
    grads = gradient_check([r["impl"] for r in rows if r["impl"] in tritons and "error" not in r])
    result = {"shape": GPU_SHAPE, "dtype": "bf16", "with": "z, D, delta_bias, softplus", "rows": rows,
              "max_scaled_error_vs_reference": errors, "gradient_check": grads, "bars": [],
              "reverse_scan_mode": reverse_scan_mode()}
    # The fastest forward+backward among the Triton rows that also passed the correctness checks.
    ok = [r for r in rows if r["impl"] in tritons and "error" not in r and gradients_ok(grads.get(r["impl"], {}))]
    tri = min(ok, key=lambda r: r["fwd_bwd"]["ms"], default=None)
    if tri:
        result["best"] = {"impl": tri["impl"], **triton_options(tri["impl"])}
        result["bars"] += [
            {"bar": f"triton forward <= {GPU_FWD_BAR_MS} ms ({tri['impl']})", "value": f"{tri['fwd']['ms']:.3f} ms",
             "pass": tri["fwd"]["ms"] <= GPU_FWD_BAR_MS},
            {"bar": f"triton forward+backward <= {GPU_FWDBWD_BAR_MS} ms ({tri['impl']})",
             "value": f"{tri['fwd_bwd']['ms']:.3f} ms", "pass": tri["fwd_bwd"]["ms"] <= GPU_FWDBWD_BAR_MS},
        ]
        mam = next((r for r in rows if r["impl"] == "mamba_ssm" and "error" not in r), None)
        if mam:
            for key in ("fwd", "fwd_bwd"):
                ratio = tri[key]["ms"] / mam[key]["ms"]
                result["bars"].append({"bar": f"triton / mamba_ssm time, {key} (goal <= 1.0)", "value": f"{ratio:.2f}",
                                       "pass": ratio <= 1.0})
    return result


def reverse_scan_mode() -> Any:
    """The backward's probed reverse-scan operand order (1 or 2; 0 = flip fallback, slower), or the error that
    stopped it."""
    try:
        import torch

        from kit.kernels.scan_triton import _reverse_mode

        return _reverse_mode(torch.device("cuda"))
    except Exception as err:  # noqa: BLE001 - recorded, the benchmark goes on
        return f"{type(err).__name__}: {err}"[:300]


def tuned_configs(impl: str) -> dict[str, str]:
    """The block shapes the autotuner picked for a Triton row (last tuned entry of each kernel: the rows run one
    after another)."""
    from kit.kernels.scan_triton import _kernels

    k = _kernels()
    out = {}
    for name in ("scan_fwd_kernel", "scan_bwd_kernel"):
        cache = getattr(getattr(k, name), "cache", {})
        if cache:
            cfg = list(cache.values())[-1]
            out[name] = f"BLOCK_D={cfg.kwargs.get('BLOCK_D')} warps={cfg.num_warps}"
    return out


# Bounds on the scaled error vs the reference at the benchmark shape (as tests/test_kernels_triton.py's tolerances).
GRAD_TOLERANCES = {"bfloat16": (2e-2, 4e-2), "float32": (2e-5, 2e-4)}


def gradients_ok(report: dict) -> bool:
    if not report:
        return False
    for dtype, errs in report.items():
        if "error" in errs:
            return False
        tol_out, tol_grad = GRAD_TOLERANCES[dtype]
        for name, err in errs.items():
            if not err <= (tol_grad if name.startswith("grad_") else tol_out):  # NaN fails
                return False
    return True


def gradient_check(impls: list[str]) -> dict[str, Any]:
    """Each Triton row vs the reference at the benchmark shape: y, last state and every input gradient (bf16 and
    fp32). {impl: {dtype: {name: scaled error}}}. The reference runs once per dtype; the Triton runs use one block
    shape (KIT_TRITON_AUTOTUNE=0) to save compiles.

    Runs where pytest may be missing (the GPU machine); the same checks live in tests/test_kernels_triton.py.
    """
    from functools import partial

    import torch

    from kit.kernels.scan_reference import selective_scan_reference
    from kit.kernels.scan_triton import selective_scan_triton
    from kit.kernels.testing import ScanCase, make_scan_inputs, max_scaled_error, run_scan

    report: dict[str, Any] = {impl: {} for impl in impls}
    quick = os.environ.get("KIT_TRITON_AUTOTUNE")
    os.environ["KIT_TRITON_AUTOTUNE"] = "0"
    try:
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).replace("torch.", "")
            case = ScanCase(GPU_SHAPE["batch"], GPU_SHAPE["dim"], GPU_SHAPE["length"], GPU_SHAPE["dstate"])
            try:
                x = make_scan_inputs(case, dtype, device="cuda")
                y_ref, last_ref, g_ref = run_scan(selective_scan_reference, x, True)
            except Exception as err:  # noqa: BLE001 - recorded, the benchmark goes on
                for impl in impls:
                    report[impl][name] = {"error": f"reference: {type(err).__name__}: {err}"[:300]}
                continue
            for impl in impls:
                try:
                    y, last, g = run_scan(partial(selective_scan_triton, **triton_options(impl)), x, True)
                    errs = {"y": max_scaled_error(y, y_ref), "last_state": max_scaled_error(last, last_ref)}
                    errs.update({f"grad_{k}": max_scaled_error(g[k], g_ref[k]) for k in g_ref})
                    report[impl][name] = errs
                except Exception as err:  # noqa: BLE001 - recorded, the benchmark goes on
                    report[impl][name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            del x, y_ref, last_ref, g_ref
            torch.cuda.empty_cache()
    finally:
        if quick is None:
            os.environ.pop("KIT_TRITON_AUTOTUNE", None)
        else:
            os.environ["KIT_TRITON_AUTOTUNE"] = quick
    return report


def show(report: dict[str, Any]) -> None:
    bars = []
    cpu = report.get("cpu")
    if cpu:
        table = Table(title=f"CPU selective scan, B={cpu['shape']['batch']} D={cpu['shape']['dim']} "
                            f"L={cpu['shape']['length']} N={cpu['shape']['dstate']} fp32, {cpu['threads']} threads")
        for col in ("impl", "fwd wall (s)", "fwd CPU (s)", "fwd+bwd wall (s)", "fwd+bwd CPU (s)"):
            table.add_column(col, justify="left" if col == "impl" else "right")
        for r in cpu["rows"]:
            table.add_row(r["impl"], f"{r['fwd']['wall_s']:.3f}", f"{r['fwd']['cpu_s']:.3f}",
                          f"{r['fwd_bwd']['wall_s']:.3f}", f"{r['fwd_bwd']['cpu_s']:.3f}")
        console.print(table)
        console.print(f"speed-up fwd {cpu['speedup_fwd']:.1f}x, fwd+bwd {cpu['speedup_fwd_bwd']:.1f}x "
                      f"(CPU time {cpu['speedup_fwd_bwd_cpu_time']:.1f}x); "
                      f"max scaled error {cpu['max_scaled_error_chunked_vs_reference']:.1e}")
        if "speedup_fwd_cpu" in cpu:
            console.print(f"fused cpu: speed-up fwd {cpu['speedup_fwd_cpu']:.1f}x, fwd+bwd {cpu['speedup_fwd_bwd_cpu']:.1f}x "
                          f"(CPU time {cpu['speedup_fwd_bwd_cpu_cpu_time']:.1f}x); "
                          f"max scaled error {cpu['max_scaled_error_cpu_vs_reference']:.1e}")
        bars.append(cpu["bar"])
    gpu = report.get("gpu")
    if gpu:
        table = Table(title=f"GPU selective scan, B={gpu['shape']['batch']} D={gpu['shape']['dim']} "
                            f"L={gpu['shape']['length']} N={gpu['shape']['dstate']} bf16 with {gpu['with']}")
        for col in ("impl", "fwd (ms)", "fwd+bwd (ms)", "fwd peak (MB)", "fwd+bwd peak (MB)", "error vs ref"):
            table.add_column(col, justify="left" if col == "impl" else "right")
        for r in gpu["rows"]:
            if "error" in r:
                table.add_row(r["impl"], f"[red]{r['error'][:80]}", "", "", "", "")
                continue
            both = r["fwd_bwd"]
            err = gpu["max_scaled_error_vs_reference"].get(r["impl"])
            table.add_row(r["impl"], f"{r['fwd']['ms']:.3f}", f"{both['ms']:.3f}" if both else "-",
                          f"{r['fwd'].get('peak_mem_mb', 0):.0f}", f"{both['peak_mem_mb']:.0f}" if both else "-",
                          "-" if err is None else f"{err:.1e}")
        console.print(table)
        for impl, per_dtype in gpu["gradient_check"].items():
            for dtype, errs in per_dtype.items():
                worst = f"{max(errs.values()):.1e}" if "error" not in errs else errs["error"]
                console.print(f"{impl} vs reference, {dtype}, outputs and all input gradients: "
                              f"worst scaled error {worst}")
        console.print(f"best Triton chunk: {gpu.get('best', 'none passed the checks')}; "
                      f"reverse-scan mode {gpu.get('reverse_scan_mode')} (1/2 = native reverse scan, 0 = flips)")
        bars += gpu["bars"]
    summary = Table(title="Bars")
    for col in ("bar", "value", "result"):
        summary.add_column(col)
    for b in bars:
        summary.add_row(b["bar"], b["value"], "[green]pass" if b["pass"] else "[red]FAIL")
    console.print(summary)


@app.command()
def main(
    threads: int = typer.Option(2, help="torch threads for the CPU section (the bar is for 2 cores)"),
    repeats: int = typer.Option(5, help="timed repetitions per measurement (reference fwd+bwd uses half)"),
    gpu: bool = typer.Option(True, help="run the GPU section when CUDA is available"),
    cpu: bool = typer.Option(True, help="run the CPU section"),
    out: Path = typer.Option(OUT, help="JSON results file"),
    chunks: str = typer.Option("512,1024", help="chunk lengths (steps per tile) to time the Triton scan at"),
) -> None:
    """Time the selective-scan implementations and check the issue's bars.

    \b
    Examples:
      python bench/kernels.py
      python bench/kernels.py --no-gpu --threads 2 --repeats 3
      python bench/kernels.py --no-cpu --chunks 256,512
    """
    import torch

    report: dict[str, Any] = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with console.status("") as status:
        if cpu:
            status.update("CPU: reference vs chunked vs cpu")
            report["cpu"] = cpu_section(threads, repeats)
        if gpu and torch.cuda.is_available():
            status.update("GPU: triton vs chunked vs mamba_ssm")
            report["gpu"] = gpu_section(max(repeats, 20), [int(c) for c in chunks.split(",") if c.strip()])
    report["machine"]["load_average_at_end"] = os.getloadavg()
    show(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    app()
