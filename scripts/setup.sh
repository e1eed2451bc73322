#!/usr/bin/env bash
# Set up a virtual environment with everything mla-pass and its tests need (CPU).
# torch is pinned here (a local CPU wheel on our machines); the library itself asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[hf,onnx,triton,bench,test]"
.venv/bin/python -c "import torch, transformers, mla_pass; print('torch', torch.__version__, '| transformers', transformers.__version__, '| mla_pass', mla_pass.__version__)"
