"""Property test: for any decoder TinyDecoder can express, the full-rank conversion is exact.

Drawn: kv heads {1, 2, 3} × group size {1, 2, 3}, head_dim {8, 12, 16}, RoPE layout (half,
interleaved, partial-half with rotary_dim = head_dim // 2 rounded to even, none), q/k/v bias,
fused or separate q/k/v, SDPA with repeat_kv, SDPA with enable_gqa or eager attention (with an
optional softcap), default or explicit scale, 1-2 layers, hidden 32 or 48, weight seed, and
the prompt (batch 1-2, length 1-9).

Examples: ``MLA_PASS_PROPERTY_EXAMPLES`` (25 by default in CI; nightly runs set 200).
"""
from __future__ import annotations

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_decoder import TinyConfig, TinyDecoder, greedy_reference

import mla_pass

torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))

TOL = 1e-4
TIE_TOL = 1e-5          # a greedy token may differ from the reference only on an exact-ish tie
NEW_TOKENS = 4
EXAMPLES = int(os.environ.get("MLA_PASS_PROPERTY_EXAMPLES", "25"))


@st.composite
def tiny_configs(draw) -> TinyConfig:
    n_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 12, 16]))
    rope = draw(st.sampled_from(["half", "interleaved", "partial-half", "none"]))
    attention = draw(st.sampled_from(["sdpa", "eager", "sdpa_gqa"]))
    return TinyConfig(
        vocab=64,
        hidden=draw(st.sampled_from([32, 48])),
        layers=draw(st.sampled_from([1, 2])),
        n_heads=n_kv * group,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        rope=rope,
        rotary_dim=(head_dim // 2) // 2 * 2 if rope.startswith("partial-") else None,
        qkv_bias=draw(st.booleans()),
        fused_qkv=draw(st.booleans()),
        attention=attention,
        scale=draw(st.sampled_from([None, 0.3])),
        softcap=draw(st.sampled_from([None, 3.0])) if attention == "eager" else None,
        seed=draw(st.integers(0, 2 ** 16)),
    )


def use_form(mla, form: str) -> None:
    mla.set_form(form)


def assert_greedy_equivalent(model, prompt: torch.Tensor, got: torch.Tensor) -> None:
    """``got`` is the source model's greedy continuation of ``prompt`` (ties aside)."""
    want = greedy_reference(model, prompt, NEW_TOKENS)
    assert got.shape == want.shape
    if torch.equal(got, want):
        return
    # A mismatch is only acceptable where the source model itself is (numerically) tied.
    s = prompt.shape[1]
    with torch.no_grad():
        logits = model(got)[:, s - 1:-1]                                   # predictions of got[:, s:]
    chosen = logits.gather(-1, got[:, s:, None])[..., 0]
    gap = (logits.max(-1).values - chosen).max().item()
    assert gap <= TIE_TOL, (f"greedy tokens differ (not a tie: the source prefers its token by {gap:.2e})\n"
                            f"converted: {got.tolist()}\nsource:    {want.tolist()}")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(cfg=tiny_configs(), batch=st.integers(1, 2), length=st.integers(1, 9), prompt_seed=st.integers(0, 1000))
def test_full_rank_conversion_is_exact(cfg, batch, length, prompt_seed):
    model = TinyDecoder(cfg)
    mla = mla_pass.convert(model, progress=False)

    # what the pass recognised
    assert len(mla.report) == cfg.layers
    for r in mla.report:
        assert (r.n_heads, r.n_kv_heads, r.head_dim) == (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        assert r.rope_layout == cfg.rope
        assert r.rotary_pairs == cfg.rotary_pairs
        assert r.qkv_bias is cfg.qkv_bias
        assert r.fused_qkv is cfg.fused_qkv
        if cfg.n_heads == cfg.n_kv_heads:
            assert r.gqa_form == "mha"          # TinyDecoder passes enable_gqa=True only for real groups
        else:
            assert r.gqa_form == ("enable_gqa" if cfg.attention == "sdpa_gqa" else "repeat_kv")

    ids = torch.randint(0, cfg.vocab, (batch, length), generator=torch.Generator().manual_seed(prompt_seed))
    with torch.no_grad():
        want = model(ids)
        got = mla(ids)
        got_cached = mla(ids, attention_mask=torch.ones_like(ids))
        use_form(mla, "absorbed")
        try:
            got_absorbed = mla(ids, attention_mask=torch.ones_like(ids))
        finally:
            use_form(mla, "auto")
    for name, g in (("forward", got), ("step program", got_cached), ("absorbed step program", got_absorbed)):
        assert g.shape == want.shape
        d = (g.double() - want.double()).abs().max().item()
        assert d <= TOL, f"{name}: max |logits - original| = {d:.3e} > {TOL:.0e} for {cfg}"

    out = mla.generate(ids, max_new_tokens=NEW_TOKENS)
    assert out.shape == (batch, length + NEW_TOKENS)
    assert torch.equal(out[:, :length], ids)
    assert_greedy_equivalent(model, ids, out)
