"""Full-rank exactness across real Hugging Face families and the generic TinyDecoder, plus the
reduced-rank machinery (absorbed vs decompressed, cache shapes and sizes, RoPE strategies,
SVD modes).

At full rank (``MLAConfig()``: ``d_kv=None, rope_freqs=None``) the conversion is an exact
refactoring, so logits must match the source model to float32 round-off and greedy
generation must produce the very same tokens.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import pytest
import torch
from tiny_decoder import TinyConfig, TinyDecoder, greedy_reference

import mla_pass
from mla_pass import MLAConfig
from mla_pass.modules.latent_attention import LatentAttention

# Tiny models on a shared 2-core machine: OpenMP spin-waiting with 2 threads next to another busy
# process slows small ops down by orders of magnitude. One thread is both faster and stable.
torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))

TOL = 1e-4
NEW_TOKENS = 32
PROMPT_SHAPES = [(1, 7), (2, 6)]

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    d = max_diff(got, want)
    assert d <= tol, f"{what}: max |diff| = {d:.3e} > tolerance {tol:.1e}"


def prompt(shape, vocab, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask).logits


def hf_greedy(model, ids, max_new_tokens=NEW_TOKENS):
    """HF greedy decoding with eos disabled, so it always produces ``max_new_tokens`` tokens."""
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.do_sample = False
    gc.max_new_tokens = max_new_tokens
    gc.min_new_tokens = None
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Hugging Face families
# --------------------------------------------------------------------------------------------
@dataclass
class Family:
    name: str
    config_cls: str
    kwargs: dict
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_layout: str
    rotary_pairs: int
    fused_qkv: bool
    qkv_bias: bool
    gqa_form: str
    attn_implementation: str | None = None
    extra: dict = field(default_factory=dict)


COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
LAYERS, HIDDEN, VOCAB = 2, 64, 128

FAMILIES = [
    Family("llama-mha", "LlamaConfig", dict(COMMON, num_key_value_heads=4), 4, 4, 16, "half", 8, False, False, "mha"),
    Family("llama-gqa", "LlamaConfig", dict(COMMON, num_key_value_heads=2), 4, 2, 16, "half", 8, False, False,
           "repeat_kv"),
    Family("llama-eager", "LlamaConfig", dict(COMMON, num_key_value_heads=2), 4, 2, 16, "half", 8, False, False,
           "repeat_kv", attn_implementation="eager"),
    Family("qwen2", "Qwen2Config", dict(COMMON, num_key_value_heads=2), 4, 2, 16, "half", 8, False, True,
           "repeat_kv"),
    Family("mistral", "MistralConfig", dict(COMMON, num_key_value_heads=2), 4, 2, 16, "half", 8, False, False,
           "repeat_kv"),
    Family("gpt2", "GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=128), 4, 4, 16,
           "none", 0, True, True, "mha"),
    Family("gpt-neox", "GPTNeoXConfig", dict(COMMON, rotary_pct=0.5), 4, 4, 16, "partial-half", 4, True, True,
           "mha"),
    Family("phi3", "Phi3Config", dict(COMMON, num_key_value_heads=2, pad_token_id=0), 4, 2, 16, "half", 8, True,
           False, "repeat_kv"),
]
FAMILY_IDS = [f.name for f in FAMILIES]


def build_hf(family: Family, seed: int = 0):
    cfg = getattr(transformers, family.config_cls)(**family.kwargs)
    if family.attn_implementation is not None:
        cfg._attn_implementation = family.attn_implementation
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # HF initialises biases (and norms) to constants: perturb everything so biases matter.
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


_CONVERTED: dict[str, tuple] = {}


@pytest.fixture(params=FAMILIES, ids=FAMILY_IDS)
def family(request):
    """(Family, source model, converted model, source weights before conversion), built once."""
    fam = request.param
    if fam.name not in _CONVERTED:
        model = build_hf(fam)
        before = snapshot(model)
        mla = mla_pass.convert(model, progress=False)
        _CONVERTED[fam.name] = (fam, model, mla, before)
    return _CONVERTED[fam.name]


def test_family_attention_implementation_is_what_the_test_claims(family):
    fam, model, _, _ = family
    if fam.attn_implementation is not None:
        assert model.config._attn_implementation == fam.attn_implementation


@pytest.mark.parametrize("cached", [False, True], ids=["forward", "step_program"])
@pytest.mark.parametrize("shape", PROMPT_SHAPES, ids=lambda s: f"b{s[0]}s{s[1]}")
def test_family_logits_exact(family, shape, cached):
    """The forward program, and the decode-step program with an empty cache."""
    fam, model, mla, _ = family
    ids = prompt(shape, VOCAB, seed=2) if cached else prompt(shape, VOCAB)
    want = hf_logits(model, ids)
    with torch.no_grad():
        got = mla(ids, attention_mask=torch.ones_like(ids)) if cached else mla(ids)
    what = "via step program (empty cache)" if cached else ""
    assert_close(got, want, f"{fam.name} full-rank logits {what}".strip())


@pytest.mark.parametrize("shape", PROMPT_SHAPES, ids=lambda s: f"b{s[0]}s{s[1]}")
def test_family_greedy_generation_exact(family, shape):
    """Long greedy runs with end tokens disabled on both sides: every one of the 32 tokens matches."""
    fam, model, mla, _ = family
    ids = prompt(shape, VOCAB, seed=3)
    want = hf_greedy(model, ids)
    got = mla.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert got.shape == (shape[0], shape[1] + NEW_TOKENS)
    assert want.shape == got.shape, f"HF produced {tuple(want.shape)}"
    assert torch.equal(got, want), f"{fam.name}: greedy tokens differ\nmla: {got.tolist()}\nhf:  {want.tolist()}"


@pytest.mark.parametrize("shape", PROMPT_SHAPES, ids=lambda s: f"b{s[0]}s{s[1]}")
def test_family_greedy_generation_default_call(family, shape):
    """``mla.generate(ids, max_new_tokens=32)`` == ``model.generate(ids, max_new_tokens=32, do_sample=False)``
    with each side's defaults (the source model's end token, if it produces one)."""
    fam, model, mla, _ = family
    ids = prompt(shape, VOCAB, seed=3)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    got = mla.generate(ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(got, want), f"{fam.name}: greedy tokens differ\nmla: {got.tolist()}\nhf:  {want.tolist()}"


def test_generation_end_token_like_hf():
    """An end token the model actually produces: both stop and pad finished rows the same way."""
    model = build_hf(FAMILIES[1], seed=3)
    ids = prompt((2, 6), VOCAB, seed=13)
    free = hf_greedy(model, ids, max_new_tokens=12)
    eos = int(free[0, 6 + 4])           # row 0 ends after 5 new tokens; row 1 keeps going (or ends too)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    mla = mla_pass.convert(model, progress=False)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    got = mla.generate(ids, max_new_tokens=12)
    assert (want[0, 6:] == eos).any()
    assert torch.equal(got, want), f"end token {eos}\nmla: {got.tolist()}\nhf:  {want.tolist()}"



def chunked_logits(mla, ids, bounds):
    """Logits of ``ids`` fed through the cache in chunks ``ids[:, a:b]`` (several tokens per step)."""
    cache, out = mla.empty_cache(ids.shape[0]), []
    with torch.no_grad():
        for a, b in bounds:
            mask = torch.ones(ids.shape[0], b, dtype=torch.long)
            logits, *cache = mla.step_with_cache(ids[:, a:b], mask, cache)
            out.append(logits)
    return torch.cat(out, dim=1)


CHUNKS = [(0, 4), (4, 7), (7, 8), (8, 10)]


def test_family_chunked_prefill_exact(family, request):
    """Multi-token steps over a non-empty cache (chunked prefill) give the original logits."""
    fam, model, mla, _ = family
    ids = prompt((2, 10), VOCAB, seed=11)
    assert_close(chunked_logits(mla, ids, CHUNKS), hf_logits(model, ids), f"{fam.name} chunked prefill")


def test_family_left_padded_generation_exact(family):
    fam, model, mla, _ = family
    ids = prompt((2, 8), VOCAB, seed=12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id, gc.pad_token_id, gc.do_sample, gc.max_new_tokens = None, 0, False, 12
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, generation_config=gc)
    got = mla.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(got, want), f"{fam.name}: left-padded greedy tokens differ\nmla: {got.tolist()}\nhf:  {want.tolist()}"
    # logits at the real (unpadded) positions
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got_logits = mla(ids, attention_mask=mask)
    real = mask.bool()
    assert_close(got_logits[real], ref[real], f"{fam.name} left-padded logits at real tokens")


def test_family_static_cache_decode_equals_the_growing_cache(family):
    """The static-cache program (buffers written in place, one shape per decode step) against
    today's growing cache: a left-padded prefill then 16 decode steps, logits ≤ 1e-5, and the
    same greedy tokens from ``generate``."""
    from mla_pass.decode import StaticCacheDecoder

    fam, _, mla, _ = family
    ids = prompt((2, 8), VOCAB, seed=13)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    decoder = StaticCacheDecoder(mla.step, mla.cache_spec, mla.plans, batch=2, capacity=8 + 17)
    cache, cur, worst = mla.empty_cache(2), ids, 0.0
    with torch.no_grad():
        for _ in range(17):
            want, *cache = mla.step_with_cache(cur, mask, cache)
            got = decoder(cur, mask)
            worst = max(worst, max_diff(got, want))
            cur = want[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(cur)], dim=1)
    assert worst <= 1e-5, f"{fam.name}: static-cache logits differ by {worst:.2e} (allowed 1e-5)"
    pad = torch.ones_like(ids)
    pad[1, :3] = 0
    growing = mla.generate(ids, attention_mask=pad, max_new_tokens=16, eos_token_id=None, static_cache=False)
    static = mla.generate(ids, attention_mask=pad, max_new_tokens=16, eos_token_id=None, static_cache=True)
    assert torch.equal(static, growing), f"{fam.name}: static-cache tokens differ"


def test_family_report(family):
    fam, model, mla, _ = family
    assert len(mla.report) == LAYERS
    assert [r.index for r in mla.report] == list(range(LAYERS))
    assert sorted(mla.plans) == list(range(LAYERS))
    for r in mla.report:
        where = f"{fam.name} site {r.index} ({r.layer})"
        assert (r.n_heads, r.n_kv_heads, r.head_dim) == (fam.n_heads, fam.n_kv_heads, fam.head_dim), where
        assert r.rope_layout == fam.rope_layout, where
        assert r.rotary_pairs == fam.rotary_pairs, where
        assert r.fused_qkv is fam.fused_qkv, where
        assert r.qkv_bias is fam.qkv_bias, where
        assert r.gqa_form == fam.gqa_form, where
        assert r.note == "", where
        assert r.original_values_per_token == 2 * fam.n_kv_heads * fam.head_dim, where
        # full rank: the smallest exact latent (the rank bound of [W_k_nope; W_v] is the hidden width)
        rope_width = 2 * fam.rotary_pairs
        rows = fam.n_kv_heads * (fam.head_dim - rope_width) + fam.n_kv_heads * fam.head_dim
        plan = mla.plans[r.index]
        assert plan.latent_dim == min(rows, HIDDEN), where
        assert plan.rope_width == fam.n_kv_heads * rope_width, where
        assert r.converted_values_per_token == min(rows, HIDDEN) + fam.n_kv_heads * rope_width, where
    assert mla.original_kv_cache_bytes_per_token(torch.float16) == LAYERS * 2 * fam.n_kv_heads * fam.head_dim * 2
    assert mla.kv_cache_bytes_per_token(torch.float16) == sum(r.converted_values_per_token for r in mla.report) * 2
    assert mla.kv_cache_bytes_per_token(torch.float32) == 2 * mla.kv_cache_bytes_per_token(torch.float16)


def test_family_source_model_untouched(family):
    fam, model, mla, before = family
    after = snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{fam.name}: convert() modified source weight {k}"


# --------------------------------------------------------------------------------------------
# TinyDecoder idioms (generic nn.Module decoders)
# --------------------------------------------------------------------------------------------
TINY_CASES = {
    "interleaved": TinyConfig(rope="interleaved"),
    "partial-interleaved": TinyConfig(rope="partial-interleaved", rotary_dim=6),
    "eager-softcap": TinyConfig(attention="eager", softcap=2.0),
    "sdpa-scale0.3": TinyConfig(attention="sdpa", scale=0.3),
    "eager-scale0.3": TinyConfig(attention="eager", scale=0.3),
    "sdpa-enable-gqa": TinyConfig(attention="sdpa_gqa"),
    "fused-bias-partial-half": TinyConfig(rope="partial-half", fused_qkv=True, qkv_bias=True),
    "none-fused-bias-eager": TinyConfig(rope="none", fused_qkv=True, qkv_bias=True, attention="eager"),
}
TINY_LAYOUT = {"interleaved": "interleaved", "partial-interleaved": "partial-interleaved",
               "fused-bias-partial-half": "partial-half", "none-fused-bias-eager": "none"}

_TINY: dict[str, tuple] = {}


@pytest.fixture(params=list(TINY_CASES), ids=list(TINY_CASES))
def tiny(request):
    name = request.param
    if name not in _TINY:
        cfg = TINY_CASES[name]
        model = TinyDecoder(cfg)
        _TINY[name] = (name, cfg, model, mla_pass.convert(model, progress=False))
    return _TINY[name]


def test_tiny_logits_exact(tiny):
    name, cfg, model, mla = tiny
    for shape in PROMPT_SHAPES:
        ids = prompt(shape, cfg.vocab)
        with torch.no_grad():
            want = model(ids)
            assert_close(mla(ids), want, f"tiny {name} logits {shape}")
            assert_close(mla(ids, attention_mask=torch.ones_like(ids)), want,
                         f"tiny {name} logits via step program {shape}")


def test_tiny_greedy_generation_exact(tiny):
    name, cfg, model, mla = tiny
    for shape in PROMPT_SHAPES:
        ids = prompt(shape, cfg.vocab, seed=5)
        want = greedy_reference(model, ids, NEW_TOKENS)
        got = mla.generate(ids, max_new_tokens=NEW_TOKENS)
        assert torch.equal(got, want), f"tiny {name} {shape}: tokens differ\nmla: {got.tolist()}\nref: {want.tolist()}"


def test_tiny_chunked_prefill_exact(tiny, request):
    name, cfg, model, mla = tiny
    ids = prompt((2, 10), cfg.vocab, seed=11)
    with torch.no_grad():
        want = model(ids)
    assert_close(chunked_logits(mla, ids, CHUNKS), want, f"tiny {name} chunked prefill")


def test_tiny_report(tiny):
    name, cfg, model, mla = tiny
    assert len(mla.report) == cfg.layers
    for r in mla.report:
        assert (r.n_heads, r.n_kv_heads, r.head_dim) == (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        assert r.rope_layout == TINY_LAYOUT.get(name, "half")
        assert r.rotary_pairs == cfg.rotary_pairs
        assert r.gqa_form == ("enable_gqa" if cfg.attention == "sdpa_gqa" else "repeat_kv")
        assert r.fused_qkv is cfg.fused_qkv
        assert r.qkv_bias is cfg.qkv_bias


# --------------------------------------------------------------------------------------------
# reduced rank: absorbed vs decompressed, cache shapes and sizes
# --------------------------------------------------------------------------------------------
D_KV, ROPE_FREQS = 4, 2
PREFILL, DECODE_STEPS = 6, 5


def latent_modules(mla):
    return [m for m in mla.modules() if isinstance(m, LatentAttention)]


def use_form(mla, form):
    """``mla.set_form(form)``, checked on every latent attention module."""
    mla.set_form(form)
    assert latent_modules(mla) and all(m.form == form for m in latent_modules(mla))


def test_set_form_public_api():
    mla = mla_pass.convert(TinyDecoder(TinyConfig(layers=1)), progress=False)
    with pytest.raises(ValueError):
        mla.set_form("bogus")
    for form in ("absorbed", "decompressed", "auto"):
        mla.set_form(form)
        assert all(m.form == form for m in latent_modules(mla))


def cached_logits(mla, ids, follow, form):
    """Logits of a prefill of ``ids`` then one token at a time through ``follow`` [B, N]."""
    use_form(mla, form)
    try:
        with torch.no_grad():
            mask = torch.ones_like(ids)
            logits, *cache = mla.step_with_cache(ids, mask, mla.empty_cache(ids.shape[0]))
            out = [logits]
            for t in range(follow.shape[1]):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                logits, *cache = mla.step_with_cache(follow[:, t:t + 1], mask, cache)
                out.append(logits)
    finally:
        use_form(mla, "auto")
    return torch.cat(out, dim=1)


REDUCED_MODELS = {
    "tiny-half": lambda: TinyDecoder(TinyConfig()),
    "tiny-eager-softcap-bias": lambda: TinyDecoder(TinyConfig(attention="eager", softcap=2.0, qkv_bias=True,
                                                              fused_qkv=True, rope="interleaved")),
    "llama-gqa": lambda: build_hf(FAMILIES[1]),
    "qwen2": lambda: build_hf(FAMILIES[3]),
}
_REDUCED: dict[str, tuple] = {}


@pytest.fixture(params=list(REDUCED_MODELS), ids=list(REDUCED_MODELS))
def reduced(request):
    name = request.param
    if name not in _REDUCED:
        model = REDUCED_MODELS[name]()
        mla = mla_pass.convert(model, MLAConfig(d_kv=D_KV, rope_freqs=ROPE_FREQS), progress=False)
        vocab = mla.vocab_size
        _REDUCED[name] = (name, model, mla, vocab)
    return _REDUCED[name]


def test_reduced_absorbed_matches_decompressed(reduced, monkeypatch):
    name, model, mla, vocab = reduced
    ids = prompt((2, PREFILL), vocab, seed=7)
    follow = prompt((2, DECODE_STEPS), vocab, seed=8)
    calls = {"absorbed": 0, "decompressed": 0}
    import mla_pass.modules.latent_attention as la
    for kind, fn in (("absorbed", "absorbed_decode"), ("decompressed", "decompressed_attention")):
        real = getattr(la, fn)

        def counting(*a, _real=real, _kind=kind, **k):
            calls[_kind] += 1
            return _real(*a, **k)
        monkeypatch.setattr(la, fn, counting)
    layers = len(mla.report)
    steps = 1 + DECODE_STEPS
    absorbed = cached_logits(mla, ids, follow, "absorbed")
    assert calls == {"absorbed": layers * steps, "decompressed": 0}, "the absorbed form did not run"
    decompressed = cached_logits(mla, ids, follow, "decompressed")
    assert calls == {"absorbed": layers * steps, "decompressed": layers * steps}, "the decompressed form did not run"
    auto = cached_logits(mla, ids, follow, "auto")
    # auto: decompressed for the prompt, absorbed for one-token steps
    assert calls == {"absorbed": layers * (steps + DECODE_STEPS), "decompressed": layers * (steps + 1)}
    assert absorbed.shape == (2, PREFILL + DECODE_STEPS, vocab)
    assert_close(absorbed, decompressed, f"{name}: absorbed vs decompressed (d_kv={D_KV}, rope_freqs={ROPE_FREQS})")
    assert_close(auto, decompressed, f"{name}: auto vs decompressed")
    # the cached decode agrees with the converted model's own full (uncached) forward
    with torch.no_grad():
        full = mla(torch.cat([ids, follow], dim=1))
    assert_close(decompressed, full, f"{name}: cached decode vs full forward of the converted model")
    # reduced rank is an approximation, not the original: it must not be (accidentally) exact
    with torch.no_grad():
        original = model(torch.cat([ids, follow], dim=1))
    original = original.logits if hasattr(original, "logits") else original
    assert max_diff(full, original) > 1e-6, f"{name}: reduced-rank model is identical to the source"


def test_reduced_cache_shapes_and_bytes(reduced):
    name, model, mla, vocab = reduced
    batch, seq = 2, PREFILL
    n_kv = mla.report[0].n_kv_heads
    layers = len(mla.report)
    for plan in mla.plans.values():
        assert plan.latent_dim == n_kv * D_KV
        assert plan.rope_width == 2 * ROPE_FREQS * plan.n_kv_heads
        assert all(len(d) == 2 * ROPE_FREQS for d in plan.rope_dims_per_kv_head)
    assert [(t.site, t.kind) for t in mla.cache_spec] == \
        [(i, k) for i in range(layers) for k in ("latent", "rope_key")]
    ids = prompt((batch, seq), vocab, seed=9)
    with torch.no_grad():
        _, *cache = mla.step_with_cache(ids, torch.ones_like(ids), mla.empty_cache(batch))
    assert len(cache) == len(mla.cache_spec)
    for spec, t in zip(mla.cache_spec, cache):
        if spec.kind == "latent":
            assert tuple(t.shape) == (batch, seq, n_kv * D_KV), spec.name
        else:
            assert tuple(t.shape) == (batch, 1, seq, n_kv * 2 * ROPE_FREQS), spec.name
    want = layers * (n_kv * D_KV + n_kv * 2 * ROPE_FREQS) * 2
    assert mla.kv_cache_bytes_per_token(torch.float16) == want
    head_dim = mla.report[0].head_dim
    assert mla.original_kv_cache_bytes_per_token(torch.float16) == layers * 2 * n_kv * head_dim * 2


def test_rope_freqs_zero_has_no_rope_key_cache():
    model = TinyDecoder(TinyConfig(layers=1))
    mla = mla_pass.convert(model, MLAConfig(d_kv=3, rope_freqs=0), progress=False)
    assert [t.kind for t in mla.cache_spec] == ["latent"]
    ids = prompt((2, 5), 64)
    with torch.no_grad():
        _, *cache = mla.step_with_cache(ids, torch.ones_like(ids), mla.empty_cache(2))
    assert [tuple(t.shape) for t in cache] == [(2, 5, 2 * 3)]
    assert mla.kv_cache_bytes_per_token(torch.float16) == 1 * (2 * 3) * 2
    follow = prompt((2, 3), 64, seed=4)
    absorbed = cached_logits(mla, ids, follow, "absorbed")
    with torch.no_grad():
        full = mla(torch.cat([ids, follow], dim=1))
    assert_close(absorbed, full, "rope_freqs=0: absorbed cached decode vs full forward")
    assert mla.generate(ids, max_new_tokens=4).shape == (2, 9)


def test_rope_freqs_zero_decompressed_decode():
    model = TinyDecoder(TinyConfig(layers=1))
    mla = mla_pass.convert(model, MLAConfig(d_kv=3, rope_freqs=0), progress=False)
    ids, follow = prompt((2, 5), 64), prompt((2, 3), 64, seed=4)
    absorbed = cached_logits(mla, ids, follow, "absorbed")
    decompressed = cached_logits(mla, ids, follow, "decompressed")
    assert_close(absorbed, decompressed, "rope_freqs=0: absorbed vs decompressed")


# --------------------------------------------------------------------------------------------
# RoPE frequency strategies
# --------------------------------------------------------------------------------------------
# TinyDecoder default: head_dim 12, "half" layout: pair k = (k, k + 6), pair 0 rotates fastest.
STRATEGY_DIMS = {
    ("half", "high"): [0, 1, 6, 7],
    ("half", "low"): [4, 5, 10, 11],
    ("half", "uniform"): [0, 5, 6, 11],
    ("interleaved", "high"): [0, 1, 2, 3],
    ("interleaved", "low"): [8, 9, 10, 11],
    ("interleaved", "uniform"): [0, 1, 10, 11],
}


@pytest.mark.parametrize("layout,strategy", list(STRATEGY_DIMS), ids=[f"{a}-{b}" for a, b in STRATEGY_DIMS])
def test_rope_strategy_kept_dims(layout, strategy):
    cfg = TinyConfig(rope=layout, layers=1)
    model = TinyDecoder(cfg)
    mla = mla_pass.convert(model, MLAConfig(rope_freqs=2, rope_strategy=strategy), progress=False)
    plan = mla.plans[0]
    assert plan.rope_width == 4 * plan.n_kv_heads
    assert len(plan.rope_dims_per_kv_head) == cfg.n_kv_heads
    for dims in plan.rope_dims_per_kv_head:
        assert dims == STRATEGY_DIMS[(layout, strategy)], f"{layout}/{strategy}: kept {dims}"
    ids = prompt((2, 6), cfg.vocab)
    with torch.no_grad():
        _, *cache = mla.step_with_cache(ids, torch.ones_like(ids), mla.empty_cache(2))
        logits = mla(ids)
    assert cache[1].shape == (2, 1, 6, 4 * cfg.n_kv_heads)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("strategy", ["high", "low", "uniform"])
@pytest.mark.parametrize("keep", [1, 3, 6])
def test_rope_strategy_counts(strategy, keep):
    """Every strategy keeps exactly ``keep`` whole pairs per kv head (keep == all: exact)."""
    cfg = TinyConfig(layers=1, rope="partial-half", rotary_dim=12, head_dim=16)    # 6 pairs (k, k + 6)
    model = TinyDecoder(cfg)
    mla = mla_pass.convert(model, MLAConfig(rope_freqs=keep, rope_strategy=strategy), progress=False)
    plan = mla.plans[0]
    assert plan.rope_width == 2 * keep * plan.n_kv_heads
    half = cfg.rotated_dims // 2
    for dims in plan.rope_dims_per_kv_head:
        assert len(dims) == len(set(dims)) == 2 * keep
        pairs = {d % half for d in dims}
        assert len(pairs) == keep and all(d < cfg.rotated_dims for d in dims)
        assert all((p in dims) and (p + half in dims) for p in pairs), f"kept dims {dims} split a pair"
    if keep == cfg.rotary_pairs:   # all pairs kept and full latent: still exact
        ids = prompt((2, 7), cfg.vocab)
        with torch.no_grad():
            assert_close(mla(ids), model(ids), f"{strategy} keeping all pairs")


def test_rope_strategy_two_norm_with_calibration():
    cfg = TinyConfig(layers=2)
    model = TinyDecoder(cfg)
    calibration = torch.randint(0, cfg.vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(model, MLAConfig(d_kv=4, rope_freqs=2, rope_strategy="2-norm"),
                           calibration=calibration, progress=False)
    for plan in mla.plans.values():
        assert plan.rope_width == 4 * plan.n_kv_heads
        assert len(plan.rope_dims_per_kv_head) == cfg.n_kv_heads
        for dims in plan.rope_dims_per_kv_head:
            assert len(set(dims)) == 4 and all(0 <= d < cfg.head_dim for d in dims)
            assert {d % 6 for d in dims} == {d for d in dims if d < 6}, f"kept dims {dims} split a pair"
    ids = prompt((2, 6), cfg.vocab)
    with torch.no_grad():
        assert torch.isfinite(mla(ids)).all()
    out = mla.generate(ids, max_new_tokens=4)
    assert out.shape == (2, 10)


def test_rope_strategy_two_norm_needs_calibration():
    model = TinyDecoder(TinyConfig(layers=1))
    with pytest.raises(ValueError, match="calibration"):
        mla_pass.convert(model, MLAConfig(d_kv=4, rope_freqs=2, rope_strategy="2-norm"), progress=False)


# --------------------------------------------------------------------------------------------
# SVD modes
# --------------------------------------------------------------------------------------------
SPLIT_CASES = {
    "half-gqa": TinyConfig(),
    "partial-half-fused-bias": TinyConfig(rope="partial-half", fused_qkv=True, qkv_bias=True, n_kv_heads=4),
    "none-eager": TinyConfig(rope="none", attention="eager"),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_svd_split_full_rank_exact(name):
    cfg = SPLIT_CASES[name]
    model = TinyDecoder(cfg)
    mla = mla_pass.convert(model, MLAConfig(svd="split"), progress=False)
    ids = prompt((2, 7), cfg.vocab)
    with torch.no_grad():
        want = model(ids)
        assert_close(mla(ids), want, f"svd=split full rank ({name})")
        assert_close(mla(ids, attention_mask=torch.ones_like(ids)), want, f"svd=split full rank, cached ({name})")
    assert torch.equal(mla.generate(ids, max_new_tokens=8), greedy_reference(model, ids, 8))


def test_svd_split_full_rank_exact_hf_neox():
    model = build_hf(FAMILIES[6])
    mla = mla_pass.convert(model, MLAConfig(svd="split"), progress=False)
    ids = prompt((2, 7), VOCAB)
    assert_close(mla(ids), hf_logits(model, ids), "gpt-neox svd=split full rank")


@pytest.mark.parametrize("svd", ["joint", "split"])
def test_activation_aware_full_rank_is_exact(svd):
    model = TinyDecoder(TinyConfig(layers=2, qkv_bias=True))
    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(model, MLAConfig(activation_aware=True, svd=svd), calibration=calibration, progress=False)
    ids = prompt((2, 7), 64)
    with torch.no_grad():
        err = (mla(ids) - model(ids)).abs().max().item()
    assert err <= 1e-4, f"activation-aware {svd} full rank: max |Δlogits| {err:.2e} > 1e-4"


@pytest.mark.parametrize("cfg", [MLAConfig(), MLAConfig(d_kv=4, rope_freqs=2)], ids=["full-rank", "reduced"])
def test_softcap_left_padded_batch_equals_each_row_alone(cfg):
    """A padding query masks every key; with softcap (explicit softmax) that row once gave NaN,
    which entered the cache and spread to the real tokens through 0·NaN."""
    torch.manual_seed(0)
    mla = mla_pass.convert(TinyDecoder(TinyConfig(attention="eager", softcap=2.0)).eval(), cfg, progress=False)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    logits, *_ = mla.step_with_cache(ids, mask, mla.empty_cache(2))
    assert not torch.isnan(logits).any()
    batch = mla.generate(ids, max_new_tokens=5, attention_mask=mask, eos_token_id=None)
    alone = mla.generate(ids[1:, 3:], max_new_tokens=5, eos_token_id=None)
    assert batch[1, 7:].tolist() == alone[0, 4:].tolist()


MIXED_FAMILIES = [f for f in FAMILIES if f.rotary_pairs and f.n_kv_heads > 1]


@pytest.mark.parametrize("fam", MIXED_FAMILIES, ids=[f.name for f in MIXED_FAMILIES])
def test_family_mixed_rope_slots(fam, monkeypatch):
    """Rotary pairs mixed across kv heads (``rope_mix="pca"``, the default with calibration): with
    every slot kept and full rank the logits are the original's under any orthogonal mixing (forced
    on here, random: RoPE commutes with U_k); at reduced rank the absorbed and decompressed forms
    agree, and so does the cached decode with the full forward."""
    from mla_pass.plan import build as plan_build

    model = build_hf(fam)
    calibration = prompt((4, 16), VOCAB, seed=21)
    real = plan_build.rope_mixing

    def random_orthogonal(site, stats, mixed=True):
        g = torch.Generator().manual_seed(site.index)
        a = torch.randn(site.rope.n_pairs, site.n_kv_heads, site.n_kv_heads, generator=g, dtype=torch.float64)
        return torch.linalg.qr(a).Q
    monkeypatch.setattr(plan_build, "rope_mixing", random_orthogonal)
    exact = mla_pass.convert(model, progress=False)
    monkeypatch.setattr(plan_build, "rope_mixing", real)
    mix = latent_modules(exact)[0].rope_mix
    assert not torch.allclose(mix, torch.eye(mix.shape[-1]).expand_as(mix)), "the mixing was not applied"
    ids = prompt((2, 6), VOCAB, seed=3)
    with torch.no_grad():
        assert_close(exact(ids), hf_logits(model, ids), f"{fam.name}: mixed slots, all kept, full rank")
    mla = mla_pass.convert(model, MLAConfig(d_kv=D_KV, rope_freqs=ROPE_FREQS), calibration=calibration, progress=False)
    assert all(p.rope_mixed for p in mla.plans.values()), mla.config
    follow = prompt((2, DECODE_STEPS), VOCAB, seed=8)
    absorbed = cached_logits(mla, ids, follow, "absorbed")
    decompressed = cached_logits(mla, ids, follow, "decompressed")
    assert_close(absorbed, decompressed, f"{fam.name}: mixed slots, absorbed vs decompressed")
    with torch.no_grad():
        full = mla(torch.cat([ids, follow], dim=1))
    assert_close(decompressed, full, f"{fam.name}: mixed slots, cached decode vs full forward")
