#!/usr/bin/env bash
# Runs every benchmark present; each writes its results under bench/out/ and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
for b in bench/ingest.py bench/dataset.py bench/kernels.py bench/backbones.py bench/train.py bench/serve.py bench/ingest_finance.py; do
  [ -f "$b" ] && python "$b"
done
