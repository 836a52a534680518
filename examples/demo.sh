#!/usr/bin/env bash
# The main path on the sample data shipped in examples/data:
# ingest FHIR -> inspect -> kit finetune --vertical clinical (pretrain, multitask finetune, evaluate, bundle)
# -> kit predict (RiskAssessments for the bulk export's patients).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=kit-runs/demo
start=$(date +%s)
kit ingest fhir examples/data/fhir --out "$OUT/events"
kit inspect "$OUT/events"
kit finetune --vertical clinical --data "$OUT/events" --workdir "$OUT" \
  --config examples/demo-train.yaml --dataset-set tokenizer.max_len=256 \
  --dataset-set splits.train=0.6 --dataset-set splits.val=0.2 --dataset-set splits.test=0.2
kit predict --bundle "$OUT/clinical.kitbundle" examples/data/fhir/bulk-ndjson --out "$OUT/risk.ndjson" --format fhir
echo "demo finished in $(( $(date +%s) - start ))s; bundle: $OUT/clinical.kitbundle"
