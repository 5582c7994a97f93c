#!/usr/bin/env bash
# Regenerate the tiny demo checkpoints in examples/models/ and the shipped
# evaluation/calibration text (cimconvert/shipped_texts/heldout.txt, calib.txt).
#
# Usage:  bash examples/regenerate_models.sh [extra train_tiny.py args, e.g. --device cuda --bf16]
#
# CPU budgets below are the ones used for the committed checkpoints (one thread
# each; all but tiny-olmoe are saved in bfloat16 to keep examples/models under 30 MB). Results are seeded but wall-clock budgets make the step count (and so
# the exact weights) depend on machine speed; pass e.g. --steps N for
# bit-reproducible runs. Set OPTIONAL=0 to skip the three optional models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT=examples/models
mkdir -p "$OUT"

"$PY" examples/train_tiny.py --arch olmoe --out "$OUT/tiny-olmoe" --time-budget 720 --threads 1 "$@"
"$PY" examples/train_tiny.py --arch mamba --out "$OUT/tiny-mamba" --time-budget 720 --threads 1 \
    --batch 16 --no-write-data --save-dtype bfloat16 "$@"

if [[ "${OPTIONAL:-1}" == "1" ]]; then
    "$PY" examples/train_tiny.py --arch qwen2_moe --out "$OUT/tiny-qwen2-moe" --time-budget 600 --threads 1 \
        --no-write-data --save-dtype bfloat16 "$@"
    "$PY" examples/train_tiny.py --arch deepseek_v2 --out "$OUT/tiny-deepseek" --time-budget 900 --threads 1 \
        --no-write-data --save-dtype bfloat16 "$@"
    "$PY" examples/train_tiny.py --arch mamba2 --out "$OUT/tiny-mamba2" --time-budget 900 --threads 1 \
        --no-write-data --save-dtype bfloat16 "$@"
fi
