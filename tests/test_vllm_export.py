"""The vLLM checkpoint export (mla_pass.export.vllm.to_vllm), checked without vLLM.

``reference.py`` computes vLLM's MLA attention from the folder's tensors alone, in its prefill
(decompressed) and decode (absorbed) forms; in fp32 it must reproduce the converted model's
logits within 1e-4 of the largest logit, for Llama (GQA, and MHA with biases) and Qwen2, at full
rank, with dropped and mixed rope slots, and with fitted maps for dropped pairs. vLLM itself runs
the same folders in ``test_vllm_serving.py``.
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama, tiny_mistral, tiny_qwen2

import mla_pass
from mla_pass import MLAConfig
from mla_pass.export.common import ExportError
from mla_pass.export.vllm import to_vllm
from mla_pass.export.vllm.reference import FORMS, reference_logits

CALIBRATION = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
MODELS = {"llama-gqa": lambda: tiny_llama(n_kv=2), "llama-mha-bias": lambda: tiny_llama(n_kv=4, bias=True),
          "qwen2": tiny_qwen2, "mistral": tiny_mistral}
CONFIGS = {"exact": (MLAConfig(), False),
           "high": (MLAConfig(d_kv=6, rope_freqs=2, rope_strategy="high"), False),
           "mixed": (MLAConfig(d_kv=6, rope_freqs=2), True),
           "nope-fit": (MLAConfig(d_kv=6, rope_freqs=2, rope_mix="none"), True),
           "budget": (MLAConfig(kv_budget=0.4), True)}


def _relative_error(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("family", list(MODELS))
def test_folder_reproduces_the_converted_model(family, config, tmp_path):
    model = MODELS[family]()
    cfg, calibrate = CONFIGS[config]
    mla = mla_pass.convert(model, cfg, calibration=CALIBRATION if calibrate else None, progress=False)
    if config == "nope-fit":
        assert mla.config.nope_fit != "none"
    out = to_vllm(mla, tmp_path / "vllm", verify=False)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = mla(ids)
        original = model(ids).logits
    for form in FORMS:
        got = reference_logits(out, ids, form)
        assert _relative_error(got, want) < 1e-4, form
        if config == "exact":
            assert _relative_error(got, original) < 1e-4, form


def test_scaled_rope_and_half_precision_weights(tmp_path):
    """Llama 3's frequency scaling reaches the folder through the program's own inv_freq; bfloat16
    weights stay within their rounding of the fp32 logits (to_vllm's check, tolerance 3e-2)."""
    from mla_pass.export.vllm.checkpoint import verify_folder

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    model = tiny_llama(n_kv=2, rope_parameters=rope)
    mla = mla_pass.convert(model, MLAConfig(d_kv=6, rope_freqs=3), calibration=CALIBRATION, progress=False)
    out = to_vllm(mla, tmp_path / "fp32")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _relative_error(reference_logits(out, ids, "absorbed"), mla(ids)) < 1e-4
    exact = mla_pass.convert(model, progress=False)
    with torch.no_grad():
        assert _relative_error(reference_logits(to_vllm(exact, tmp_path / "exact"), ids), model(ids).logits) < 1e-4
    half = to_vllm(mla, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((half / "config.json").read_text())["mla_pass"]["cache_bytes_per_token"] == 2 * 576 * 2
    assert 1e-4 < verify_folder(half, mla) < 3e-2


def test_config_states_the_layout_and_pads_with_zeros(tmp_path):
    from safetensors.torch import load_file

    mla = mla_pass.convert(tiny_llama(n_kv=2), MLAConfig(kv_budget=0.4), calibration=CALIBRATION, progress=False)
    widths = [p.latent_dim for p in mla.plans.values()], [p.rope_width for p in mla.plans.values()]
    for layout, (latent, rope) in {"deepseek": (512, 64), "compact": (320 - max(widths[1]), max(widths[1]))}.items():
        out = to_vllm(mla, tmp_path / layout, layout=layout)
        config = json.loads((out / "config.json").read_text())
        assert (config["model_type"], config["architectures"]) == ("deepseek_v2", ["MLAPassLlamaForCausalLM"])
        assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (latent, rope)
        info = config["mla_pass"]
        assert (info["latent_widths"], info["rope_widths"]) == widths
        assert info["cache_bytes_per_token"] == len(mla.plans) * (latent + rope) * 4
        assert info["stated_cache_values_per_token"] == sum(map(sum, widths)) < info["original_cache_values_per_token"]
        assert "exact" in info["padding"] and info["layout"] == layout
        tensors = load_file(str(out / "model.safetensors"))
        for i, plan in mla.plans.items():
            kv_a = tensors[f"model.layers.{i}.self_attn.kv_a_proj.weight"]
            assert kv_a.shape == (latent + rope, 64)
            assert not kv_a[plan.latent_dim:latent].any() and not kv_a[latent + plan.rope_width:].any()
            kv_b = tensors[f"model.layers.{i}.self_attn.kv_b_proj.weight"]
            assert kv_b.shape == (4 * (16 + 16), latent) and not kv_b[:, plan.latent_dim:].any()
        assert "lm_head.weight" not in tensors or not config["tie_word_embeddings"]


def test_max_rope_width_caps_what_the_budget_allocates():
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    model = tiny_llama(n_kv=2)
    free = mla_pass.convert(model, MLAConfig(kv_budget=0.6), calibration=calibration, progress=False)
    assert max(p.rope_width for p in free.plans.values()) > 8          # the cap below binds
    capped = mla_pass.convert(model, MLAConfig(kv_budget=0.6, max_rope_width=8), calibration=calibration,
                              progress=False)
    assert max(p.rope_width for p in capped.plans.values()) <= 8
    assert sum(p.cached_values_per_token for p in capped.plans.values()) <= 0.6 * 2 * 2 * 2 * 16
    with pytest.raises(ValueError, match="even integer >= 2"):
        MLAConfig(kv_budget=0.5, max_rope_width=3)
    with pytest.raises(ValueError, match="give kv_budget too"):
        MLAConfig(d_kv=4, max_rope_width=8)


def test_refusals(tmp_path):
    model = tiny_llama(n_kv=2)
    with pytest.raises(ExportError, match="needs a converted model .* unconverted model has no latent cache"):
        to_vllm(model, tmp_path / "original")
    assert not (tmp_path / "original").exists()
    mla = mla_pass.convert(model, MLAConfig(d_kv=6, rope_freqs=2, rope_strategy="high"), progress=False)
    with pytest.raises(ValueError, match="layout must be one of"):
        to_vllm(mla, tmp_path / "x", layout="flash")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        to_vllm(mla, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    wide = tiny_llama(n_kv=4, layers=1, head_dim=32)      # 4 kv heads x 32 dims, every one rotated
    with pytest.raises(ExportError, match=r"rope 128 values, more than the deepseek layout's 512 \+ 64.*"
                                          r"max_rope_width=64"):
        to_vllm(mla_pass.convert(wide, progress=False), tmp_path / "wide")
    with pytest.raises(ExportError, match="sliding window of 16 tokens"):
        to_vllm(mla_pass.convert(tiny_mistral(sliding_window=16), MLAConfig(d_kv=6, rope_freqs=2,
                                                                           rope_strategy="high"), progress=False),
                tmp_path / "window")
    from transformers import AutoModelForCausalLM, GPT2Config
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)).eval()
    with pytest.raises(ExportError, match="serves converted llama, mistral, qwen2 models.*'gpt2'"):
        to_vllm(mla_pass.convert(gpt2, MLAConfig(d_kv=8), progress=False), tmp_path / "gpt2")


def test_cli_export_format_vllm(tmp_path, capsys):
    from mla_pass.cli import main

    hf = tmp_path / "hf"
    tiny_llama(n_kv=2).save_pretrained(str(hf))
    out = tmp_path / "served"
    assert main(["export", str(hf), "--out", str(out), "--format", "vllm", "--d-kv", "4", "--rope-freqs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "for vLLM: layout deepseek (576 cached values per token per layer, 4,608 bytes/token" in printed
    assert "vllm serve" in printed
    assert json.loads((out / "config.json").read_text())["kv_lora_rank"] == 512
    assert main(["export", str(hf), "--out", str(tmp_path / "q"), "--format", "vllm", "--quantize", "int8",
                 "--d-kv", "4"]) == 2
    assert "--quantize belong to the ONNX export" in capsys.readouterr().err
