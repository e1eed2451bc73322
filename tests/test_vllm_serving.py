"""vLLM serves exported converted models: its greedy tokens are ``mla.generate``'s.

vLLM runs in its own venv (``scripts/setup_vllm.sh``: ``.venv-vllm``, which CI builds; it pins a
torch and transformers of its own), driven by ``mla_pass.export.vllm.drive`` in a subprocess on
the folders this venv exports. float32 on vLLM's CPU_MLA backend (its C++ decode kernel for the
deepseek layout, the plugin's torch decode for the compact one): 2 prompts x 16 new tokens each,
for a tiny Llama (GQA), a tiny Qwen2 (q/k/v biases), a tiny Mistral and the real SmolLM2-135M at
kv_budget=0.3125; the latent cache vLLM allocates per token is the width the folder states (its
padding included).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, tiny_mistral, tiny_qwen2

import mla_pass
from mla_pass import MLAConfig
from mla_pass.export.vllm import to_vllm
from mla_pass.export.vllm.drive import run_elsewhere

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("MLA_PASS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
NEW_TOKENS = 16


def _vllm_available() -> str | None:
    if not VLLM_PYTHON.is_file():
        return f"no vLLM venv at {VLLM_PYTHON}: run scripts/setup_vllm.sh (CI builds it) to run these tests"
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm, mla_pass.export.vllm.plugin"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode:
        return f"vLLM does not import in {VLLM_PYTHON}: {probe.stderr.strip().splitlines()[-1:]}"
    return None


pytestmark = pytest.mark.skipif(bool(reason := _vllm_available()), reason=reason or "")


def serve(folder: Path, tmp_path: Path, **request) -> dict:
    """Run the folder on vLLM (a fresh process) → the driver's JSON result."""
    return run_elsewhere(VLLM_PYTHON, folder, {"max_tokens": NEW_TOKENS, **request}, timeout=600)


def greedy(mla, prompts: list[list[int]]) -> list[list[int]]:
    return [mla.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, eos_token_id=None)[0, len(p):].tolist()
            for p in prompts]


def check_cache(result: dict, folder: Path, layers: int) -> None:
    stated = json.loads((folder / "config.json").read_text())["mla_pass"]
    cache = result["cache"]
    assert cache["spec"] == "MLAAttentionSpec" and cache["num_kv_heads"] == 1 and cache["layers"] == layers
    assert cache["head_size"] == stated["cache_values_per_token_per_layer"]
    assert cache["bytes_per_token"] == stated["cache_bytes_per_token"]


BACKENDS = {"deepseek": "CPU_MLA (CPUMLABackend)", "compact": "CPU_MLA (AnyWidthCPUMLABackend)"}


MODELS = {"llama-gqa": lambda: tiny_llama(n_kv=2), "qwen2": tiny_qwen2, "mistral": tiny_mistral}


@pytest.mark.parametrize("family, layout", [("llama-gqa", "deepseek"), ("llama-gqa", "compact"), ("qwen2", "deepseek"),
                                            ("mistral", "compact")])
def test_tiny_models_match_generate(family, layout, tmp_path):
    model = MODELS[family]()
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(model, MLAConfig(d_kv=6, rope_freqs=2), calibration=calibration, progress=False)
    folder = to_vllm(mla, tmp_path / "vllm", layout=layout)
    prompts = [[1, 5, 9, 33, 2, 7, 90], [100, 3, 4]]
    result = serve(folder, tmp_path, prompts=prompts)
    assert result["backend"] == [BACKENDS[layout]]
    assert result["tokens"] == greedy(mla, prompts)
    check_cache(result, folder, layers=2)


@pytest.mark.slow
def test_smollm2_at_a_budget_matches_generate(smollm2, tmp_path):
    from mla_pass.quality.windows import calibration_windows

    model, tok = smollm2
    config = MLAConfig(kv_budget=0.3125, max_rope_width=64)       # CPU_MLA's rope part is 64 wide
    mla = mla_pass.convert(model, config, calibration=calibration_windows(tok, 2, 512), progress=False)
    folder = to_vllm(mla, tmp_path / "vllm", layout="compact", tokenizer=tok)     # head size 320, not 576
    texts = ["The capital of France is", "Alice was beginning to get very tired of sitting by her sister"]
    result = serve(folder, tmp_path, texts=texts, max_model_len=512)
    prompts = [tok(t).input_ids for t in texts]
    assert result["prompts"] == prompts                    # vLLM tokenizes with the folder's tokenizer
    assert result["tokens"] == greedy(mla, prompts)
    assert result["backend"] == [BACKENDS["compact"]]
    check_cache(result, folder, layers=30)
