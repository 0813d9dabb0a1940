#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the package with test extras.
# torch is pinned to the local CPU build on machines that have it (constraints.txt);
# set OSP_SKIP_TORCH_PIN=1 on a GPU/NPU machine where torch is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if [ "${OSP_SKIP_TORCH_PIN:-0}" = "1" ]; then
  $PIP install -q -e '.[test]'
else
  $PIP install -q torch==2.13.0
  $PIP install -q -c constraints.txt -e '.[test]'
fi
.venv/bin/python -c "import torch, megatron.core, mindspeed_mm_osp; print('installed: torch', torch.__version__)"
