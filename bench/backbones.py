"""Backbone training steps: our Mamba vs a same-size Llama (SDPA) vs transformers' Mamba without its CUDA kernels.

One training step = forward, next-token cross-entropy over the LM head, backward, AdamW step. Peak memory: on CPU the
peak RSS of a subprocess per case; on GPU torch's peak allocated bytes over the timed steps (cases share a process).

Examples:
    python bench/backbones.py                      # CPU: tiny (~1M) models, batch 8, length 512, 2 threads
    python bench/backbones.py --no-hf              # skip transformers' slow path (minutes per step on CPU)
    python bench/backbones.py --device cuda        # GPU: base (8 layers, hidden 768), bf16, lengths 2048 and 16384
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "backbones.json"
CPU_STEP_BAR_S = 1.5
GPU_RATIO_BARS = {2048: 0.5, 16384: 1.5}

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
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------- one case (runs in a child process)


def build(case: dict[str, Any]):
    if case["model"] == "hf-mamba":
        from transformers import MambaConfig, MambaForCausalLM

        from kit.models.config import SIZE_PRESETS

        preset = SIZE_PRESETS[case["size"]]
        config = MambaConfig(vocab_size=case["vocab"], hidden_size=preset["hidden_size"],
                             num_hidden_layers=preset["num_layers"], state_size=16, use_cache=False)
        return MambaForCausalLM(config)
    from kit.models import BackboneConfig, ModelConfig, build_model

    kind = {"kit-mamba": "mamba", "kit-llama": "transformer"}[case["model"]]
    model = build_model(ModelConfig(backbone=BackboneConfig(kind=kind, size=case["size"], vocab_size=case["vocab"])))
    if kind == "mamba" and case.get("scan_impl"):
        model.backbone.set_scan_impl(case["scan_impl"])
    return model


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    device = torch.device(case["device"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(case).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, case["vocab"], (case["batch"], case["length"]), device=device)
    # Next-token targets without slicing the (B, L, V) logits (a copy as large as the logits).
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["dtype"] == "bf16")

    cpu_times: list[float] = []

    def step() -> float:
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast:
            if case["model"] == "hf-mamba":
                loss = model(ids, labels=ids).loss
            else:
                logits = model(ids).lm_logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        cpu_times.append(time.process_time() - cpu_start)
        return time.perf_counter() - start

    for _ in range(case["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cpu_times.clear()
    times = [step() for _ in range(case["steps"])]
    seconds = statistics.median(times)
    result = {
        **case,
        "params": params,
        "step_s": seconds,
        "step_times_s": times,
        # CPU seconds of this process (all its threads): steadier than wall time when other work shares the cores.
        "step_cpu_s": statistics.median(cpu_times),
        "tokens_per_s": case["batch"] * case["length"] / seconds,
    }
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        # ru_maxrss is in KiB on Linux; the baseline is the interpreter with torch loaded, before the model.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["peak_mem_gb"] = peak * 1024 / 1e9
        result["peak_mem_over_baseline_gb"] = (peak - rss_before) * 1024 / 1e9
    return result


def run_in_process(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    try:
        return run_case(case)
    except torch.cuda.OutOfMemoryError as err:
        return {**case, "error": f"out of memory: {str(err).splitlines()[0]}"}
    except Exception as err:  # one failing case must not hide the others' figures
        return {**case, "error": f"{type(err).__name__}: {err}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_in_child(case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(case["threads"]), "MKL_NUM_THREADS": str(case["threads"])}
    cmd = [sys.executable, __file__, "--case", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**case, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the plan and the report


def plan(
    device: str,
    hf: bool,
    threads: int,
    scan_impl: str | None,
    size: str | None = None,
    shapes: list[tuple[int, int]] | None = None,
    dtype: str | None = None,
) -> list[dict[str, Any]]:
    """CPU: tiny models, 8 x 512, fp32. GPU: base models, bf16, 8 x 2048 and 1 x 16384 (same tokens per step)."""
    gpu = device != "cpu"
    size = size or ("base" if gpu else "tiny")
    shapes = shapes or ([(8, 2048), (1, 16384)] if gpu else [(8, 512)])
    dtype = dtype or ("bf16" if gpu else "fp32")
    timing = {"warmup": 2, "steps": 5} if gpu else {"warmup": 1, "steps": 3}
    cases = []
    for batch, length in shapes:
        common = {"device": device, "size": size, "vocab": 4096, "batch": batch, "length": length, "dtype": dtype,
                  "threads": threads, "scan_impl": scan_impl, **timing}
        cases += [{**common, "model": "kit-mamba"}, {**common, "model": "kit-llama"}]
        # transformers' slow path: minutes per step, so one step, and on GPU only at the shorter length.
        if hf and (not gpu or length <= 2048):
            cases.append({**common, "model": "hf-mamba", "warmup": 0, "steps": 1})
    return cases


def parse_shape(text: str) -> tuple[int, int]:
    batch, _, length = text.lower().partition("x")
    return int(batch), int(length)


def bars(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def find(model: str, length: int):
        return next((r for r in results if r["model"] == model and r["length"] == length and "error" not in r), None)

    checks = []
    for length in sorted({r["length"] for r in results}):
        mamba, llama = find("kit-mamba", length), find("kit-llama", length)
        if mamba is None:
            continue
        if mamba["device"] == "cpu" and mamba["size"] == "tiny" and mamba["batch"] == 8 and length == 512:
            checks.append({"bar": f"kit Mamba step at L={length}, B={mamba['batch']} < {CPU_STEP_BAR_S} s (wall)",
                           "value": f"{mamba['step_s']:.3f} s ({mamba['step_cpu_s']:.3f} CPU s, "
                                    f"{mamba['threads']} thread(s))",
                           "pass": mamba["step_s"] < CPU_STEP_BAR_S})
        elif llama is not None and length in GPU_RATIO_BARS and mamba["size"] == "base" and mamba["dtype"] == "bf16":
            ratio = mamba["tokens_per_s"] / llama["tokens_per_s"]
            checks.append({"bar": f"Mamba/Llama tokens/s at L={length} >= {GPU_RATIO_BARS[length]}",
                           "value": f"{ratio:.2f}x", "pass": ratio >= GPU_RATIO_BARS[length]})
            if length == 16384:
                checks.append({"bar": "Mamba peak memory < Llama at L=16384",
                               "value": f"{mamba['peak_mem_gb']:.1f} vs {llama['peak_mem_gb']:.1f} GB",
                               "pass": mamba["peak_mem_gb"] < llama["peak_mem_gb"]})
        hf = find("hf-mamba", length)
        if hf is not None:
            checks.append({"bar": f"kit Mamba vs transformers' slow path at L={length} (speed-up, info)",
                           "value": f"{hf['step_s'] / mamba['step_s']:.0f}x", "pass": None})
    return checks


def show(results: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    table = Table(title="Backbone training step (forward + LM loss + backward + AdamW)")
    columns = ["model", "device", "dtype", "threads", "params", "batch x length", "step (s)", "step CPU (s)",
               "tokens/s", "peak mem (GB)"]
    for col in columns:
        table.add_column(col, justify="right" if col not in ("model", "device", "dtype") else "left")
    for r in results:
        if "error" in r:
            table.add_row(r["model"], r["device"], r["dtype"], str(r["threads"]), "-", f"{r['batch']} x {r['length']}",
                          "-", "-", "-", f"[red]{r['error'][:60]}")
            continue
        table.add_row(r["model"], r["device"], r["dtype"], str(r["threads"]), f"{r['params'] / 1e6:.2f}M",
                      f"{r['batch']} x {r['length']}", f"{r['step_s']:.3f}", f"{r['step_cpu_s']:.3f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['peak_mem_gb']:.2f}")
    console.print(table)
    if checks:
        summary = Table(title="Bars")
        for col in ("bar", "value", "result"):
            summary.add_column(col)
        for c in checks:
            verdict = "info" if c["pass"] is None else ("[green]pass" if c["pass"] else "[red]FAIL")
            summary.add_row(c["bar"], c["value"], verdict)
        console.print(summary)


@app.command()
def main(
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    hf: bool = typer.Option(True, help="also time transformers' MambaForCausalLM slow path (slow on CPU)"),
    threads: int = typer.Option(2, help="torch threads (the CPU bar is for 2 cores)"),
    scan_impl: Optional[str] = typer.Option(None, help="force a kit.kernels selective-scan implementation"),
    size: Optional[str] = typer.Option(None, help="size preset (default: tiny on CPU, base on GPU)"),
    shape: Optional[list[str]] = typer.Option(None, help="BATCHxLENGTH, repeatable (default: 8x512 on CPU)"),
    dtype: Optional[str] = typer.Option(None, help="fp32 or bf16 (autocast); default fp32 on CPU, bf16 on GPU"),
    timeout: float = typer.Option(900.0, help="seconds allowed per case"),
    out: Path = typer.Option(OUT, help="JSON results file"),
    case: Optional[str] = typer.Option(None, hidden=True, help="internal: run one case given as JSON"),
) -> None:
    """Time training steps of our Mamba, a same-size Llama (SDPA) and transformers' Mamba; check the bars.

    \b
    Examples:
      python bench/backbones.py                # CPU: tiny (~1M) models, batch 8 x 512, 2 threads
      python bench/backbones.py --no-hf        # skip transformers' slow path (minutes per step on CPU)
      python bench/backbones.py --device cuda  # GPU: 8 layers x 768, bf16, 8 x 2048 and 1 x 16384
    """
    if case is not None:
        print(json.dumps(run_case(json.loads(case))))
        return
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    host = machine()
    results = []
    shapes = [parse_shape(s) for s in shape] if shape else None
    cases = plan(device, hf, threads, scan_impl, size=size, shapes=shapes, dtype=dtype)
    with console.status("") as status:
        for i, c in enumerate(cases, 1):
            status.update(f"[{i}/{len(cases)}] {c['model']} {c['batch']} x {c['length']} on {c['device']}")
            # GPU cases share one process, so Triton compiles and autotunes once; torch's peak counter is reset per
            # case. CPU cases each get a process, since peak RSS can only be read per process.
            results.append(run_in_process(c) if c["device"] != "cpu" else run_in_child(c, timeout))
    checks = bars(results)
    show(results, checks)
    out.parent.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = {"machine": {**host, "load_average_at_end": os.getloadavg()}, "when": when, "results": results,
              "bars": checks}
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    app()
