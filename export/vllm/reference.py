"""The exported folder's attention in plain torch: what vLLM's MLA layer computes from its weights.

``reference_logits(folder, ids, form)`` rebuilds the base family's Hugging Face decoder, loads the
folder's other weights into it and replaces every attention by ``ExportedLatentAttention``, which
reads only the folder's tensors and config, in vLLM's two forms: ``"decompressed"`` (prefill: keys
and values from ``kv_b_proj``) and ``"absorbed"`` (decode: queries projected into latent space,
scores and values over the cached latent and rope key). ``to_vllm(verify=True)`` holds both to the
converted model's logits, so a folder is checked where vLLM is not installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .folder import WEIGHTS_FILE
from .rotary import rotate_slots

FORMS = ("decompressed", "absorbed")


class ExportedLatentAttention(nn.Module):
    """One layer's attention from the folder's tensors ``t`` (names without the layer prefix)."""

    def __init__(self, t: dict[str, torch.Tensor], config: dict, layer: int, form: str):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        mla = config["mla_pass"]
        self.t, self.form = t, form
        self.n = config["num_attention_heads"]
        self.dh, self.dv = config["qk_nope_head_dim"], config["v_head_dim"]
        self.latent, self.rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
        self.scale, self.rope_scaling = mla["scales"][layer], mla["rope_scaling_factor"]

    def forward(self, hidden_states, *args, **kwargs):
        t, n = self.t, self.n
        b, s, _ = hidden_states.shape
        x = hidden_states.reshape(b * s, -1)
        positions = torch.arange(s, device=x.device).repeat(b)

        def linear(name):
            return nn.functional.linear(x, t[name + ".weight"], t.get(name + ".bias"))

        q_nope = linear("q_nope_proj").reshape(b, s, n, self.dh)
        q_pe = rotate_slots(linear("q_rope_proj").reshape(b * s, n, self.rope), positions, t["rope_freq"],
                            self.rope_scaling) * t["q_rope_scale"]
        latent, k_pe = linear("kv_a_proj").split([self.latent, self.rope], dim=-1)
        k_pe = rotate_slots(k_pe, positions, t["rope_freq"], self.rope_scaling)
        q_pe, latent, k_pe = q_pe.reshape(b, s, n, -1), latent.reshape(b, s, -1), k_pe.reshape(b, s, -1)
        w = t["kv_b_proj.weight"].reshape(n, self.dh + self.dv, self.latent)
        w_uk, w_uv = w[:, :self.dh], w[:, self.dh:]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        rope_scores = torch.einsum("bqhr,bkr->bhqk", q_pe, k_pe)
        if self.form == "decompressed":
            k_nope = torch.einsum("bkc,hdc->bkhd", latent, w_uk)
            v = torch.einsum("bkc,hvc->bkhv", latent, w_uv)
            scores = torch.einsum("bqhd,bkhd->bhqk", q_nope, k_nope) + rope_scores
            probs = (scores * self.scale).masked_fill(~causal, float("-inf")).softmax(-1)
            out = torch.einsum("bhqk,bkhv->bqhv", probs, v)
        else:
            q_latent = torch.einsum("bqhd,hdc->bqhc", q_nope, w_uk)
            scores = torch.einsum("bqhc,bkc->bhqk", q_latent, latent) + rope_scores
            probs = (scores * self.scale).masked_fill(~causal, float("-inf")).softmax(-1)
            out = torch.einsum("bqhc,hvc->bqhv", torch.einsum("bhqk,bkc->bqhc", probs, latent), w_uv)
        out = out.reshape(b, s, n * self.dv)
        if "v_bias" in t:
            out = out + t["v_bias"]
        return nn.functional.linear(out, t["o_proj.weight"], t.get("o_proj.bias")), None


def reference_model(folder: str | Path, form: str = "decompressed", dtype: torch.dtype | None = None) -> nn.Module:
    """The base family's Hugging Face model running the folder's weights, attention as vLLM's."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    base = dict(config["mla_pass"]["base_config"])
    hf_config = AutoConfig.for_model(base.pop("model_type"), **base)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    dtype = next(iter(tensors.values())).dtype
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.self_attn."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        layer.self_attn = ExportedLatentAttention(own, config, i, form)
    rest = {k: v for k, v in tensors.items() if ".self_attn." not in k}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    tied = hf_config.tie_word_embeddings
    missing = [k for k in missing if ".self_attn." not in k and not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights missing {missing[:3]} / unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    return model


@torch.no_grad()
def reference_logits(folder: str | Path, input_ids: torch.Tensor, form: str = "decompressed") -> torch.Tensor:
    return reference_model(folder, form)(input_ids).logits
