"""Benchmark training throughput: tokens/s of multitask finetuning steps for both backbones at the tiny and small
presets, on real rows of the shipped sample data (examples/data/fhir), on this machine's CPU (and CUDA if present).

    python bench/train.py                     # tiny and small, mamba and transformer
    python bench/train.py --steps 5 --max-len 512
Results: bench/out/train.json and a table. Tokens counted are real (non-pad) tokens per optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"


def build(max_len: int) -> Path:
    root = OUT / "train"
    events, dataset = root / "events", root / f"dataset-{max_len}"
    if not events.exists():
        subprocess.run([sys.executable, "-m", "kit", "ingest", "fhir", str(REPO / "examples/data/fhir"), "--out", str(events)],
                       check=True, capture_output=True)
    if not dataset.exists():
        subprocess.run([sys.executable, "-m", "kit", "dataset", "build", "--vertical", "clinical", "--events", str(events),
                        "--out", str(dataset), "--set", f"tokenizer.max_len={max_len}"], check=True, capture_output=True)
    return dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    from kit.train.config import load_train_config
    from kit.train.data import load_dataset, mixing_probabilities, sample_batch
    from kit.train.finetune import new_model, resolve_device
    from kit.train.objectives import multitask_loss

    ds = load_dataset(build(args.max_len))
    tasks = ds.supervised_tasks()
    types = {t.name: t.type for t in tasks}
    probs = mixing_probabilities(ds, [t.name for t in tasks])
    device = resolve_device("auto")
    results = []
    for backbone in ("mamba", "transformer"):
        for size in ("tiny", "small"):
            cfg = load_train_config(overrides=[f"model.backbone={backbone}", f"model.size={size}"])
            model = new_model(ds, cfg, tasks).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            times, tokens = [], 0
            for step in range(args.steps + 1):  # step 0 warms up
                rows = sample_batch(ds.splits["train"], probs, args.batch_size, seed=0, step=step)
                t0 = time.perf_counter()
                opt.zero_grad()
                loss, _ = multitask_loss(model.train(), rows, types, device)
                loss.backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step:
                    times.append(time.perf_counter() - t0)
                    tokens += sum(len(r.input_ids) for r in rows)
            params = sum(p.numel() for p in model.parameters())
            results.append({"backbone": backbone, "size": size, "params": params, "s_per_step": sum(times) / len(times),
                            "tokens_per_s": tokens / sum(times), "batch_size": args.batch_size, "max_len": args.max_len})
    meta = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads, "device": str(device),
            "torch": torch.__version__, "load_avg": os.getloadavg()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = Table(title=f"training throughput ({device}, {args.threads} threads, batch {args.batch_size}, max_len {args.max_len})")
    for col in ("backbone", "size", "params", "s/step", "tokens/s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["backbone"], r["size"], f"{r['params'] / 1e6:.2f}M", f"{r['s_per_step']:.2f}", f"{r['tokens_per_s']:,.0f}")
    Console().print(table)
    Console().print(f"load average during the run: {meta['load_avg']}")


if __name__ == "__main__":
    main()
