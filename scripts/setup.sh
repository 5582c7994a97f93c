#!/usr/bin/env bash
# Set up .venv for cimconvert on a fresh machine: the CPU torch wheel first (a bare `torch`
# requirement would pull a multi-GB CUDA build), then the package with pinned dependencies.
#
# GPU machine: CIMCONVERT_TORCH=cuda ./scripts/setup.sh installs the CUDA build of the same torch
# version from the PyTorch wheel index (CIMCONVERT_TORCH_INDEX overrides it, e.g. another cuXYZ tag);
# `--device cuda` / `auto` then run on the GPU. CIMCONVERT_TORCH=cpu (the default) keeps the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
TORCH_BUILD="${CIMCONVERT_TORCH:-cpu}"
if [ "$TORCH_BUILD" != cpu ] && [ "$TORCH_BUILD" != cuda ]; then
  echo "error: CIMCONVERT_TORCH must be cpu or cuda (got '$TORCH_BUILD')" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ "$TORCH_BUILD" = cuda ]; then
  "${PIP[@]}" --index-url "${CIMCONVERT_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}" "torch==$TORCH_VERSION"
else
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
"${PIP[@]}" -e ".[dev]"
if [ "$TORCH_BUILD" = cuda ]; then
  .venv/bin/python -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs visible:', torch.cuda.device_count())"
else
  .venv/bin/python -c "import torch; assert not torch.version.cuda, 'expected the CPU torch wheel'"
fi
