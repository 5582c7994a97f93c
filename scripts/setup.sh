#!/usr/bin/env bash
# Set up .venv for cimconvert on a fresh machine: the CPU torch wheel first (a bare `torch`
# requirement would pull a multi-GB CUDA build), then the package with pinned dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
.venv/bin/python -c "import torch; assert not torch.version.cuda, 'expected the CPU torch wheel'"
