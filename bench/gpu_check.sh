#!/usr/bin/env bash
# One prepared GPU check for issue 4's kernels (and, when present, the backbone benchmark).
# Runs the benchmarks, then the kernel tests at real shapes (the CUDA tests skip elsewhere), and writes
# everything under $OUT (default bench/out/gpu): logs, JUnit XML, JSON results, nvidia-smi and versions.
# The kernel benchmark times the Triton scan at the chunk lengths in CHUNKS and records the fastest correct one as
# "best" in kernels.json; the backbone benchmark and the CUDA tests then run with it (KIT_TRITON_SCAN_T, or the
# default when the kernel step did not run). The tests cover that one chunk only (compiles at real shapes take time).
#
#   bash bench/gpu_check.sh            # kernels, backbones, then tests (about 2.5 minutes, at most 4.5)
#   bash bench/gpu_check.sh tests      # one step: tests | kernels | backbones
# Per-step limits: KERNELS_LIMIT, BACKBONES_LIMIT, TESTS_LIMIT (seconds).
#
# Needs torch with CUDA, triton, typer and rich; not polars/pydantic (kit.kernels does not import them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEP="${1:-all}"
status=0

{
  date -u
  nvidia-smi || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
  python -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"  # tests reuse what the benchmarks compiled
export PYTHONUNBUFFERED=1
# Timings first (the whole GPU to themselves), then the correctness suite at real shapes.
if [ "$STEP" = all ] || [ "$STEP" = kernels ]; then
  run kernels "${KERNELS_LIMIT:-110}" python bench/kernels.py --no-cpu --chunks "${CHUNKS:-512,1024}" \
    --out "$OUT/kernels.json"
fi
best_chunk=$(python -c "import json, sys; b = json.load(open(sys.argv[1]))['gpu'].get('best') or {}; print(b.get('chunk_size', ''))" "$OUT/kernels.json" 2>/dev/null)
export KIT_TRITON_SCAN_T="${best_chunk:-${KIT_TRITON_SCAN_T:-}}"
echo "== Triton scan chunk '${KIT_TRITON_SCAN_T:-default}' for the next steps" | tee -a "$OUT/summary.txt"
if [ "$STEP" = all ] || [ "$STEP" = backbones ]; then
  run backbones "${BACKBONES_LIMIT:-70}" python bench/backbones.py --device cuda --no-hf --out "$OUT/backbones.json"
fi
if [ "$STEP" = all ] || [ "$STEP" = tests ]; then
  # One block shape for the tests keeps compiles short. --noconftest: the CPU-extension prebuild and data fixtures
  # in tests/conftest.py are not needed by these modules.
  if python -c "import pytest" 2>/dev/null; then
    KIT_TRITON_AUTOTUNE=0 run tests "${TESTS_LIMIT:-80}" python -m pytest -q -rA -p no:cacheprovider --noconftest \
      --junitxml="$OUT/tests.xml" tests/test_kernels_triton.py \
      tests/test_models.py::test_lora_adapters_all_get_gradient_triton \
      tests/test_models.py::test_triton_backbone_matches_reference_on_gpu
  else
    echo "== tests: pytest is not installed here; bench/kernels.py still checks outputs and gradients" | tee -a "$OUT/summary.txt"
  fi
fi
exit $status
