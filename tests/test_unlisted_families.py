"""Families nobody listed convert exactly too: the matcher keys on dataflow, not on names.

Each: full-rank logits ≤ 1e-4 against the original and greedy tokens equal to greedy decoding
by full recomputation with the original model (Hugging Face's own cached generate is not the
reference: for Gemma2 it differs from its own forward).
"""
import os

import pytest
import torch
import transformers as T

import mla_pass

torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))

KW = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
FAMILIES = {
    # name: (config factory, expected rope layout)
    "gptj": (lambda: T.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8), "partial-interleaved"),
    "gemma": (lambda: T.GemmaConfig(**KW, num_key_value_heads=2, head_dim=16), "half"),
    "gemma2": (lambda: T.Gemma2Config(**KW, num_key_value_heads=2, head_dim=16), "half"),   # softcap, custom scale
    "stablelm": (lambda: T.StableLmConfig(**KW, num_key_value_heads=2, partial_rotary_factor=0.25), "partial-half"),
    "falcon": (lambda: T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      new_decoder_architecture=True, num_kv_heads=2), "half"),
    "olmo": (lambda: T.OlmoConfig(**KW, num_key_value_heads=2), "half"),
    "starcoder2": (lambda: T.Starcoder2Config(**KW, num_key_value_heads=2), "half"),
    "gpt_bigcode": (lambda: T.GPTBigCodeConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, multi_query=True), "none"),
    "opt": (lambda: T.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                ffn_dim=128, word_embed_proj_dim=64), "none"),
    "cohere": (lambda: T.CohereConfig(**KW, num_key_value_heads=2), "interleaved"),
    "phi": (lambda: T.PhiConfig(**KW, partial_rotary_factor=0.5), "partial-half"),
    # RMS-normalised keys before RoPE: the per-token scale is cached beside the latent
    "qwen3": (lambda: T.Qwen3Config(**KW, num_key_value_heads=2, head_dim=16), "half"),       # per head
    "olmo2": (lambda: T.Olmo2Config(**KW, num_key_value_heads=2), "half"),                    # whole projection
}


def _model(factory):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(factory()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_unlisted_family_is_exact(name):
    factory, layout = FAMILIES[name]
    model = _model(factory)
    mla = mla_pass.convert(model, progress=False)
    assert len(mla.report) == 2 and all(r.rope_layout == layout for r in mla.report), mla.report
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        err = (mla(ids) - ref).abs().max().item()
        assert err <= 1e-4, f"{name}: max |Δlogits| {err:.2e} > 1e-4"
        seq = ids
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(mla.generate(ids, max_new_tokens=8, eos_token_id=None), seq)


@pytest.mark.parametrize("name, factory, reason", [
    ("bloom", lambda: T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4), "aten.where"),  # ALiBi
])
def test_unsupported_families_are_refused_with_a_reason(name, factory, reason):
    model = _model(factory)
    with pytest.raises(mla_pass.UnsupportedAttentionError, match=reason):
        mla_pass.convert(model, progress=False)
    with pytest.warns(UserWarning, match="left untouched"):
        mla = mla_pass.convert(model, mla_pass.MLAConfig(best_effort=True), progress=False)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.allclose(mla(ids), model(ids).logits, atol=1e-5)
    assert mla.generate(ids, max_new_tokens=3, eos_token_id=None).shape == (1, 9)   # recomputes, no cache


@pytest.mark.parametrize("name, groups", [("qwen3", 2), ("olmo2", 1)])
def test_key_norm_scale_is_cached_and_absorbed_exactly(name, groups):
    """Reduced rank with RMS-normalised keys: absorbed decode == decompressed == full forward,
    and the cache carries one scale per kv head (Qwen3) or per token (OLMo2)."""
    model = _model(FAMILIES[name][0])
    mla = mla_pass.convert(model, mla_pass.MLAConfig(d_kv=4, rope_freqs=2), progress=False)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    follow = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(6))
    runs = {}
    for form in ("absorbed", "decompressed"):
        mla.set_form(form)
        mask = torch.ones(2, 7, dtype=torch.long)
        logits, *cache = mla.step_with_cache(ids, mask, mla.empty_cache(2))
        outs = [logits]
        for i in range(follow.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            logits, *cache = mla.step_with_cache(follow[:, i:i + 1], mask, cache)
            outs.append(logits)
        runs[form] = torch.cat(outs, dim=1)
    mla.set_form("auto")
    with torch.no_grad():
        full = mla(torch.cat([ids, follow], dim=1))
    for form, got in runs.items():
        err = (got - full).abs().max().item()
        assert err <= 1e-4, f"{name} {form} cached decode vs full forward: {err:.2e} > 1e-4"
    assert mla.plans[0].cache_kinds == ["latent", "rope_key", "key_scale"]
    scale = cache[2]
    assert tuple(scale.shape) == (2, groups, 10)
    assert mla.kv_cache_bytes_per_token(torch.float16) == 2 * (2 * 4 + 2 * 4 + groups) * 2
