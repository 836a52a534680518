"""FHIR ingest benchmark: MB/s, resources/s and peak RSS of `kit ingest fhir`, default path vs --validate full.

The shared Synthea bundles (../shared/data/fhir/synthea-r4-bundles, ~400 MB of JSON) are cloned with fresh ids
(every UUID remapped) and shifted dates (every date moved by a whole number of weeks per clone) until the set holds
at least --target-gb of decompressed JSON. The clones are gzipped like the originals and go to a temporary directory
(never the repo); they are reused across runs when the parameters match.

Each measured run is the real command in a subprocess; peak RSS is sampled from /proc over the whole process tree
(the command plus its parsing workers), both the largest single process and the largest sum.

    python bench/ingest.py                      # >= 1 GB, default path on all of it, full path on a subset
    python bench/ingest.py --target-gb 0.2      # quicker
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "fhir" / "synthea-r4-bundles"
OUT = REPO / "bench" / "out"

UUID_RE = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DATE_RE = re.compile(rb'(?<=")(\d{4})-(\d{2})-(\d{2})(?=[T"])')


def _clone_bytes(raw: bytes, clone: int) -> bytes:
    uuids: dict[bytes, bytes] = {}
    dates: dict[bytes, bytes] = {}
    shift = dt.timedelta(weeks=clone)

    def new_uuid(m: re.Match) -> bytes:
        old = m.group(0)
        hit = uuids.get(old)
        if hit is None:
            h = hashlib.md5(b"%d:" % clone + old).hexdigest().encode()
            hit = uuids[old] = b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:32]))
        return hit

    def new_date(m: re.Match) -> bytes:
        old = m.group(0)
        hit = dates.get(old)
        if hit is None:
            d = dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3))) + shift
            hit = dates[old] = d.isoformat().encode()
        return hit

    return DATE_RE.sub(new_date, UUID_RE.sub(new_uuid, raw))


def generate(target_bytes: int, dest: Path) -> tuple[list[Path], int]:
    """Clone the shared bundles into `dest` until `target_bytes` of JSON; returns files and JSON bytes."""
    marker = dest.with_name(dest.name + ".done.json")  # beside, not inside: the ingest reads every .json
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta["target_bytes"] == target_bytes:
            return sorted(dest.glob("clone-*/*.json.gz")), meta["json_bytes"]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    sources = sorted(p for p in SHARED.glob("*_*.json.gz"))
    total, clone, files = 0, 0, []
    t0 = time.perf_counter()
    while total < target_bytes:
        clone += 1
        d = dest / f"clone-{clone:03d}"
        d.mkdir()
        for src in sources:
            data = _clone_bytes(gzip.decompress(src.read_bytes()), clone)
            f = d / f"{hashlib.md5(src.name.encode() + bytes([clone])).hexdigest()}.json.gz"
            f.write_bytes(gzip.compress(data, compresslevel=1))
            files.append(f)
            total += len(data)
            if total >= target_bytes:
                break
        print(f"  clone {clone}: {total / 1e9:.2f} GB of JSON so far ({time.perf_counter() - t0:.0f}s)", flush=True)
    marker.write_text(json.dumps({"target_bytes": target_bytes, "json_bytes": total, "files": len(files)}))
    return sorted(files), total


class TreeRss:
    """Samples the RSS of a process and all its descendants from /proc."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak_sum = self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
        out, stack = [], [self.pid]
        while stack:
            p = stack.pop()
            out.append(p)
            stack.extend(children.get(p, ()))
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self._tree():
                try:
                    with open(f"/proc/{p}/status", "rb") as fh:
                        for line in fh:
                            if line.startswith(b"VmRSS:"):
                                kb = int(line.split()[1])
                                total += kb
                                self.peak_single = max(self.peak_single, kb)
                                break
                except OSError:
                    continue
            self.peak_sum = max(self.peak_sum, total)
            time.sleep(self.interval)


def run_ingest(inputs: list[Path], out: Path, extra: list[str]) -> dict:
    import resource

    cmd = [sys.executable, "-m", "kit", "ingest", "fhir", *map(str, inputs), "--out", str(out), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    with TreeRss(proc.pid) as rss:
        _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the command and its workers (all waited for): robust to other work sharing the cores.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed ({proc.returncode}): {err[-2000:]}")
    report = json.loads((out / "metadata" / "ingest_report.json").read_text())
    resources = sum(n for k, n in report["records"].items())
    rejected = sum(n for k, n in report["records"].items() if k.endswith("|rejected"))
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "resources": resources,
        "rejected": rejected,
        "events": report["events"],
        "shards": report["shards"],
        "peak_rss_mb_sum": rss.peak_sum / 1024,
        "peak_rss_mb_single": rss.peak_single / 1024,
    }


def parse_only_baseline(files: list[Path]) -> float:
    """gzip + orjson.loads alone, one core: the floor any JSON ingest pays. Returns MB/s."""
    import orjson

    n, t0 = 0, time.perf_counter()
    for f in files:
        raw = gzip.decompress(f.read_bytes())
        orjson.loads(raw)
        n += len(raw)
    return n / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-gb", type=float, default=1.05, help="decompressed JSON to generate (default 1.05)")
    ap.add_argument("--full-subset-mb", type=float, default=120, help="JSON for the --validate full run")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kit-bench-fhir")
    ap.add_argument("--workers", type=int, default=0, help="passed to --workers (0: one per core)")
    ap.add_argument("--default-only", action="store_true", help="only the default path on the whole set")
    args = ap.parse_args()
    if not SHARED.exists():
        raise SystemExit(f"shared data not found at {SHARED}")

    print(f"generating >= {args.target_gb} GB of cloned Synthea bundles in {args.workdir}/data ...", flush=True)
    files, json_bytes = generate(int(args.target_gb * 1e9), args.workdir / "data")
    sizes = {}
    # A subset for the slow path: whole files from the start of the list up to the requested JSON size.
    subset, acc = [], 0
    per_file = json_bytes / len(files)
    for f in files:
        if acc >= args.full_subset_mb * 1e6:
            break
        subset.append(f)
        acc += per_file
    subset_dir = args.workdir / "subset"
    shutil.rmtree(subset_dir, ignore_errors=True)
    subset_dir.mkdir()
    subset_bytes = 0
    for f in subset:
        os.link(f, subset_dir / f.name)
        with gzip.open(f, "rb") as fh:
            subset_bytes += len(fh.read())
    sizes = {"all": json_bytes, "subset": subset_bytes}

    extra = ["--workers", str(args.workers)] if args.workers else []
    runs = {}
    baseline = parse_only_baseline(subset[: max(1, len(subset) // 3)])
    plan = [
        ("default (fast) path", [args.workdir / "data"], "all", []),
        ("default path, subset", [subset_dir], "subset", []),
        ("--validate full, subset", [subset_dir], "subset", ["--validate", "full"]),
    ]
    for label, inputs, size_key, flags in plan[:1] if args.default_only else plan:
        out = args.workdir / "out"
        shutil.rmtree(out, ignore_errors=True)
        print(f"running {label} on {sizes[size_key] / 1e6:,.0f} MB ...", flush=True)
        r = run_ingest(inputs, out, extra + flags)
        r["json_mb"] = sizes[size_key] / 1e6
        r["mb_per_s"] = r["json_mb"] / r["seconds"]
        r["resources_per_s"] = r["resources"] / r["seconds"]
        r["mb_per_cpu_s"] = r["json_mb"] / r["cpu_seconds"]
        runs[label] = r
        shutil.rmtree(out, ignore_errors=True)

    fast = runs["default (fast) path"]
    full = runs.get("--validate full, subset")
    # Full validation is measured on a subset; its throughput (a rate) is what extrapolates to the whole set.
    speedup = fast["mb_per_s"] / full["mb_per_s"] if full else float("nan")
    speedup_cpu = fast["mb_per_cpu_s"] / full["mb_per_cpu_s"] if full else float("nan")
    machine = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }
    result = {
        "machine": machine,
        "runs": runs,
        "parse_only_1core_mb_per_s": baseline,
        "fast_over_full_wall": speedup,
        "fast_over_full_cpu": speedup_cpu,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("ingest-default.json" if args.default_only else "ingest.json")).write_text(json.dumps(result, indent=2))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kit ingest fhir on {machine['cores']} cores ({machine['cpu']})", title_justify="left")
    cols = ("run", "JSON MB", "wall s", "MB/s", "resources/s", "CPU s", "MB/CPU-s", "peak RSS MB (tree)", "load")
    for c in cols:
        table.add_column(c, justify="right" if c != "run" else "left")
    for label, r in runs.items():
        table.add_row(
            label, f"{r['json_mb']:,.0f}", f"{r['seconds']:,.1f}", f"{r['mb_per_s']:,.1f}",
            f"{r['resources_per_s']:,.0f}", f"{r['cpu_seconds']:,.1f}", f"{r['mb_per_cpu_s']:,.1f}",
            f"{r['peak_rss_mb_sum']:,.0f}", f"{r['load_avg_1min'][0]:.1f}",
        )
    Console(width=160).print(table)
    print(f"baseline gzip+orjson only, 1 core: {baseline:,.1f} MB/s")
    print(f"default / full throughput: {speedup:.1f}x wall-clock, {speedup_cpu:.1f}x per CPU-second")
    bars = {
        "default >= 50 MB/s": fast["mb_per_s"] >= 50,
        "default >= 8x full (wall)": speedup >= 8,
        "default >= 8x full (CPU)": speedup_cpu >= 8,
        "peak RSS < 2 GB": max(r["peak_rss_mb_sum"] for r in runs.values()) < 2048,
    }
    for k, ok in bars.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {k}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
