"""Finance ingest benchmark: wall time of `kit ingest finance` on the shared AMLSim 20K simulation.

Inputs: ../shared/data/finance/aml-transactions-amlsim/20K_fanin200cycle200 (nodes.csv.gz: 20,000 accounts;
transactions.csv.gz: 120,558 transfers). Each run is the real command in a fresh subprocess (so it includes
interpreter start-up and imports), plus one in-process run of `run_ingest` split into its phases' total.
Also times the UCI credit-default table (18,030 clients x 24 events) for the wide-table path.

Results go to bench/out/ingest_finance.json.

    python bench/ingest_finance.py              # 3 repeats
    python bench/ingest_finance.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIN = REPO.parent / "shared" / "data" / "finance"
AMLSIM = FIN / "aml-transactions-amlsim" / "20K_fanin200cycle200"
UCI = FIN / "credit-default-uci-taiwan" / "UCI_Credit_Card.dev.csv.gz"


def _cli(paths: list[Path], out: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kit", "ingest", "finance", *map(str, paths), "--out", str(out)],
                   check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not AMLSIM.exists():
        sys.exit(f"shared data not found: {AMLSIM}")
    sys.path.insert(0, str(REPO))
    from connectors.finance.ingest import run_ingest

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory(prefix="kit-bench-finance-") as tmp:
        tmp = Path(tmp)
        for label, paths in (("amlsim-20k", [AMLSIM]), ("uci-dev", [UCI])):
            cli = [_cli(paths, tmp / f"{label}-cli-{i}") for i in range(args.repeats)]
            inproc = []
            for i in range(args.repeats):
                s = run_ingest(paths, tmp / f"{label}-lib-{i}")
                inproc.append(s.seconds)
            rows = sum(v.get("records", 0) for v in s.by_format.values())
            results[label] = {
                "input_rows": rows,
                "events": s.events,
                "subjects": s.subjects,
                "cli_seconds_median": round(statistics.median(cli), 3),
                "cli_seconds_all": [round(x, 3) for x in cli],
                "in_process_seconds_median": round(statistics.median(inproc), 3),
                "rows_per_second_in_process": round(rows / statistics.median(inproc)),
            }
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest_finance.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
