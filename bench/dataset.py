"""Benchmark `kit dataset build --vertical clinical`: build time per 1k subjects and peak RSS.

The shared Synthea population (340 subjects) is ingested once, then cloned at the event level to N subjects
(default 10,000): every clone gets a fresh subject id (`subject_id_for("<Patient id>#clone<k>")`) and its times
shifted by k * 11 days, so no two clones coincide. The baseline build of the original 340 subjects runs in the same
invocation. Each build runs in a child process so its peak RSS is its own.

    python bench/dataset.py                       # 10k subjects
    python bench/dataset.py --subjects 2000       # quicker
Results: bench/out/dataset.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kit.events import CODES_FILE, DATASET_FILE, SUBJECTS_FILE, read_subjects, scan_events, subject_id_for  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "fhir" / "synthea-r4-bundles"
OUT = REPO / "bench" / "out" / "dataset"


def base_store(out: Path) -> Path:
    store = out / "events-base"
    if not store.exists():
        src = SHARED if SHARED.exists() else REPO / "examples" / "data" / "fhir"
        subprocess.run([sys.executable, "-m", "kit", "ingest", "fhir", str(src), "--out", str(store)], check=True, cwd=REPO)
    return store


def clone_store(base: Path, n_subjects: int, out: Path, subjects_per_shard: int = 2000) -> Path:
    """An event store of n_subjects made of time-shifted copies of the base population, fresh ids."""
    store = out / f"events-{n_subjects}"
    if store.exists():
        return store
    tmp = out / f".events-{n_subjects}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    (tmp / "metadata").mkdir()
    subjects = read_subjects(base).sort("subject_id")
    events = scan_events(base).collect()
    n_base = subjects.height
    copies = -(-n_subjects // n_base)
    all_subjects, shard, buffered, n_done = [], 0, [], 0
    for k in range(copies):
        take = subjects.head(min(n_base, n_subjects - n_done))
        if take.height == 0:
            break
        shift = timedelta(days=11 * k)
        new_ids = {sid: subject_id_for(f"{src}#clone{k}") for sid, src in take.select("subject_id", "source_subject_id").iter_rows()}
        mapping = pl.DataFrame({"subject_id": list(new_ids), "new_id": list(new_ids.values())}, schema={"subject_id": pl.Int64, "new_id": pl.Int64})
        ev = (
            events.join(mapping, on="subject_id", how="inner", maintain_order="left")
            .with_columns(pl.col("new_id").alias("subject_id"), pl.col("time") + shift)
            .with_columns(pl.col("encounter_id") + f"#c{k}", pl.col("source_id") + f"#c{k}")
            .drop("new_id")
        )
        all_subjects.append(
            take.join(mapping, on="subject_id")
            .with_columns(
                pl.col("new_id").alias("subject_id"), pl.col("source_subject_id") + f"#clone{k}",
                pl.col("birth_time") + shift, pl.col("death_time") + shift,
            )
            .drop("new_id")
        )
        buffered.append(ev)
        n_done += take.height
        if sum(b.get_column("subject_id").n_unique() for b in buffered) >= subjects_per_shard or n_done >= n_subjects:
            pl.concat(buffered).sort("subject_id", "time", nulls_last=False, maintain_order=True).write_parquet(
                tmp / "data" / f"shard-{shard:05d}.parquet"
            )
            shard, buffered = shard + 1, []
    pl.concat(all_subjects).sort("subject_id").write_parquet(tmp / SUBJECTS_FILE)
    shutil.copy(base / CODES_FILE, tmp / CODES_FILE)
    meta = json.loads((base / DATASET_FILE).read_text())
    meta["dataset_name"] = f"synthea-clones-{n_subjects}"
    meta["dataset_version"] = f"{meta.get('dataset_version')}-clones-{n_subjects}"
    (tmp / DATASET_FILE).write_text(json.dumps(meta))
    tmp.rename(store)
    return store


def timed_build(events: Path, out: Path, overrides: list[str]) -> dict:
    """Run `kit dataset build` in a child process; wall time and that child's peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cmd = [sys.executable, "-m", "kit", "dataset", "build", "--vertical", "clinical", "--events", str(events), "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    manifest = json.loads((out / "manifest.json").read_text())
    rows = sum(sum(c["samples"] for c in t["counts"].values()) for t in manifest["tasks"].values())
    size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    n = sum(manifest["subjects"].values())
    return {
        "subjects": n, "seconds": round(wall, 2), "seconds_per_1k_subjects": round(wall / n * 1000, 2),
        "rows": rows, "rows_per_second": round(rows / wall), "parquet_mb": round(size / 1e6, 1),
        # ru_maxrss of children is the max over all waited-for children: only trust it when it grew.
        "peak_rss_mb": round(after / 1024) if after > before else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=10_000)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="Build config override.")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    base = base_store(OUT)
    t0 = time.perf_counter()
    big = clone_store(base, args.subjects, OUT)
    clone_s = time.perf_counter() - t0
    results = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "overrides": args.overrides,
        "baseline": timed_build(base, OUT / "dataset-base", args.overrides),
        "scaled": timed_build(big, OUT / f"dataset-{args.subjects}", args.overrides),
        "clone_seconds": round(clone_s, 1),
    }
    (REPO / "bench" / "out").mkdir(exist_ok=True)
    (REPO / "bench" / "out" / "dataset.json").write_text(json.dumps(results, indent=1) + "\n")
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kit dataset build --vertical clinical ({results['machine']})", title_justify="left")
    for col in ("run", "subjects", "seconds", "s / 1k subjects", "rows", "rows/s", "parquet MB", "peak RSS MB"):
        t.add_column(col, justify="right")
    for name in ("baseline", "scaled"):
        r = results[name]
        t.add_row(name, f"{r['subjects']:,}", str(r["seconds"]), str(r["seconds_per_1k_subjects"]), f"{r['rows']:,}",
                  f"{r['rows_per_second']:,}", str(r["parquet_mb"]), str(r["peak_rss_mb"]))
    Console().print(t)


if __name__ == "__main__":
    main()
