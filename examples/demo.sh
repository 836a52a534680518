#!/usr/bin/env bash
# The main path on the sample data shipped in examples/data.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=kit-runs/demo
kit ingest fhir examples/data/fhir --out "$OUT/events"
kit inspect "$OUT/events"
