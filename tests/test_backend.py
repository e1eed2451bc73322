"""``torch.compile(..., backend="mla")``: the pass as a dynamo backend, compressed cache included.

References: ``mla_pass.convert(model, same config)`` (logits, ``generate``), the original model
(full rank; sites left untouched). Generation is compiled the way Hugging Face documents,
``model.forward = torch.compile(model.forward, ...)``, with its ``DynamicCache``.

Recompile bound for a 32-token generation: at most 3 graphs and no graph break: the prefill
(prompt, empty cache), the first decode step (dynamo first specialises the cache length), and
one graph with a dynamic cache length that serves every later step.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

import mla_pass
from mla_pass import MLAConfig
from mla_pass.dynamo.backend import latent_modules, parse_options

torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))
transformers = pytest.importorskip("transformers")
from test_families import FAMILIES, build_hf  # noqa: E402  (tiny models of every family)
from torch._dynamo.utils import counters  # noqa: E402

EAGER_TOL, INDUCTOR_TOL = 1e-4, 1e-3
NEW_TOKENS = 32
MAX_GRAPHS = 3
# Mistral's default config gives sliding-window cache layers (left untouched, tested below);
# without a window its layers are plain DynamicLayers.
FAMS = {f.name: f for f in FAMILIES}
FAMS["mistral"] = replace(FAMS["mistral"], kwargs={**FAMS["mistral"].kwargs, "sliding_window": None})
LOGIT_FAMILIES = list(FAMS)
# RMS-normalised keys: the per-head key scale rides in the latent slot
FAMS["qwen3"] = replace(FAMS["qwen2"], name="qwen3", config_cls="Qwen3Config",
                        kwargs={**FAMS["llama-gqa"].kwargs, "head_dim": 16})


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def options_for(fam, **extra) -> dict:
    """A reduced conversion every family accepts (2 of its rotary pairs, 4 latent dims per kv head)."""
    return {"d_kv": 4, "rope_freqs": 2 if fam.rotary_pairs else None, "inner": "eager", **extra}


def config_of(options: dict) -> MLAConfig:
    return MLAConfig(**{k: v for k, v in options.items() if k != "inner"})


def compiled(model, options: dict):
    """A copy of ``model`` whose forward is compiled with the mla backend (HF's documented way)."""
    copy_ = copy.deepcopy(model)
    copy_.forward = torch.compile(copy_.forward, backend="mla", options=options)
    return copy_


def prompt(shape, seed=1):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# --------------------------------------------------------------------------------------------
# logits
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOGIT_FAMILIES)
def test_logits_match_convert(name):
    fam = FAMS[name]
    model = build_hf(fam)
    options = options_for(fam)
    want = mla_pass.convert(model, config_of(options), progress=False)(prompt((2, 6)))
    with torch.no_grad():
        got = compiled(model, options)(prompt((2, 6))).logits
    d = max_diff(got, want)
    assert d <= EAGER_TOL, f"{name}: compiled vs convert max |diff| = {d:.2e} > {EAGER_TOL:.0e}"
    assert counters["mla"]["sites_rewritten"] == 2                # both layers


@pytest.mark.parametrize("name", ["llama-gqa", "phi3"])
def test_full_rank_equals_original(name):
    model = build_hf(FAMS[name])
    ids = prompt((2, 6))
    with torch.no_grad():
        want = model(ids).logits
        got = compiled(model, {"inner": "eager"})(ids).logits
    d = max_diff(got, want)
    assert d <= EAGER_TOL, f"{name}: full-rank compiled vs original max |diff| = {d:.2e}"
    assert counters["mla"]["sites_rewritten"] == 2


def test_inductor_logits_match_convert():
    fam = FAMS["llama-gqa"]
    model = build_hf(fam)
    options = options_for(fam, inner="inductor")
    want = mla_pass.convert(model, config_of(options), progress=False)(prompt((2, 6)))
    with torch.no_grad():
        got = compiled(model, options)(prompt((2, 6))).logits
    d = max_diff(got, want)
    assert d <= INDUCTOR_TOL, f"inductor: compiled vs convert max |diff| = {d:.2e} > {INDUCTOR_TOL:.0e}"
    assert counters["inductor"] and counters["mla"]["sites_rewritten"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: inductor's CUDA (Triton) path needs one")
def test_inductor_on_cuda_logits_and_generation():
    """The same rewrite through inductor's GPU code generation: logits match convert (on the GPU, TF32
    off) and a compiled-forward generation over the compressed cache gives mla.generate's tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    fam = FAMS["llama-gqa"]
    model = build_hf(fam).cuda()
    options = options_for(fam, inner="inductor")
    mla = mla_pass.convert(model, config_of(options), progress=False)
    ids = prompt((2, 6), seed=3).cuda()
    want = mla(ids)
    with torch.no_grad():
        got = compiled(model, options)(ids).logits
    d = max_diff(got, want)
    assert d <= INDUCTOR_TOL, f"inductor on CUDA: compiled vs convert max |diff| = {d:.2e} > {INDUCTOR_TOL:.0e}"
    assert counters["mla"]["sites_rewritten"] == 2
    cm = compiled(model, options)
    cm.generation_config.eos_token_id = None
    torch._dynamo.reset()
    out = cm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(out, mla.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None))


# --------------------------------------------------------------------------------------------
# generation over the compressed DynamicCache
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-gqa", "llama-eager", "gpt2", "gpt-neox", "qwen3"])
def test_generate_keeps_compressed_cache(name, record_property):
    fam = FAMS[name]
    model = build_hf(fam)
    options = options_for(fam)
    mla = mla_pass.convert(model, config_of(options), progress=False)
    ids = prompt((2, 6), seed=3)
    want = mla.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    cm = compiled(model, options)
    cm.generation_config.eos_token_id = None          # always 32 tokens, like mla.generate(eos_token_id=None)
    torch._dynamo.reset()
    counters.clear()
    out = cm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                      pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want), f"{name}: tokens differ\ncompiled: {out.sequences.tolist()}\n" \
                                             f"mla:      {want.tolist()}"
    # the cache holds latent + rope keys: exactly the converted model's bytes per token
    tokens = ids.shape[1] + NEW_TOKENS - 1                    # the last token is never fed back
    held = cache_bytes(out.past_key_values)
    assert held == mla.kv_cache_bytes_per_token(torch.float32) * tokens * ids.shape[0]
    assert held < mla.original_kv_cache_bytes_per_token(torch.float32) * tokens * ids.shape[0]
    plan = mla.plans[0]
    layer = out.past_key_values.layers[0]
    if plan.rope_width:
        assert tuple(layer.keys.shape) == (2, 1, tokens, plan.rope_width)
        assert tuple(layer.values.shape) == (2, 1, tokens, plan.latent_dim + plan.key_scale_groups)
    else:                                                     # GPT-2: no rope keys, latent in the key slot
        assert tuple(layer.keys.shape) == (2, 1, tokens, plan.latent_dim)
    assert out.past_key_values.get_seq_length() == tokens
    # recompiles and graph breaks, bounded; the SVD ran once per layer for all graphs
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    record_property("graphs", graphs)
    record_property("graph_breaks", breaks)
    print(f"{name}: {graphs} graphs, {breaks} graph breaks for {NEW_TOKENS} tokens")
    assert graphs <= MAX_GRAPHS and breaks == 0, f"{graphs} graphs, {breaks} graph breaks"
    assert counters["mla"]["factorisations"] == len(mla.plans)
    assert counters["mla"]["sites_rewritten"] == graphs * len(mla.plans)


def test_generate_left_padded_batch():
    """Padding comes from the model's own mask; the first row's prompt is left-padded."""
    fam = FAMS["llama-gqa"]
    model = build_hf(fam)
    options = options_for(fam)
    mla = mla_pass.convert(model, config_of(options), progress=False)
    ids = prompt((2, 7), seed=6)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    cm = compiled(model, options)
    cm.generation_config.eos_token_id = None
    got = cm.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    want = mla.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(got, want), f"compiled: {got.tolist()}\nmla:      {want.tolist()}"
    assert counters["mla"]["sites_refused"] == 0


def test_sliding_window_cache_left_untouched_with_one_warning_per_layer():
    """Mistral's sliding-window cache layers are not DynamicLayers: the backend leaves those
    sites untouched (one warning each, naming the reason) and generation stays exact."""
    model = build_hf(FAMILIES[[f.name for f in FAMILIES].index("mistral")])
    cm = compiled(model, options_for(FAMS["mistral"]))
    ids = prompt((1, 6), seed=4)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cm.generate(ids, **kw, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want)
    msgs = [str(w.message) for w in caught if "mla backend" in str(w.message)]
    assert len(msgs) == 2 and all("sliding-window" in m for m in msgs), msgs
    assert got.past_key_values.layers[0].keys.shape[-1] == FAMS["mistral"].head_dim   # full K/V kept


def test_eager_call_on_compressed_cache_is_a_clear_error():
    fam = FAMS["llama-gqa"]
    model = build_hf(fam)
    cm = compiled(model, options_for(fam))
    ids = prompt((1, 5))
    with torch.no_grad():
        out = cm(ids, use_cache=True)
        with pytest.raises(RuntimeError, match="compressed tensors of torch.compile"):
            model(prompt((1, 1), seed=2), past_key_values=out.past_key_values)


def test_other_backends_and_eager_unchanged():
    """With the backend imported, the cache update still behaves as DynamicLayer's cat (the
    custom op only appears while dynamo traces; its kernel is that cat)."""
    model = build_hf(FAMS["llama-gqa"])
    ids = prompt((2, 5))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw, return_dict_in_generate=True)
    other = copy.deepcopy(model)
    other.forward = torch.compile(other.forward, backend="eager")
    got = other.generate(ids, **kw, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.past_key_values.layers, want.past_key_values.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_cache_append_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mla_pass.ops.cache_append import cache_append
    new_k, new_v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 6)
    k, v = cache_append(torch.tensor([]), torch.tensor([]), new_k, new_v)        # DynamicLayer's start
    assert torch.equal(k, new_k) and torch.equal(v, new_v)
    k2, v2 = cache_append(k, v, new_k, new_v)
    assert torch.equal(k2, torch.cat([k, new_k], -2)) and torch.equal(v2, torch.cat([v, new_v], -2))
    with FakeTensorMode():                       # compressed slots: shape-agnostic fake
        k3, v3 = cache_append(torch.empty(2, 3, 5, 2), torch.empty(2, 1, 5, 7), torch.empty(2, 3, 1, 8),
                              torch.empty(2, 3, 1, 6))
    assert tuple(k3.shape) == (2, 3, 6, 8) and tuple(v3.shape) == (2, 3, 6, 6)
    stored = torch.randn(2, 3, 5, 8, requires_grad=True)
    new = torch.randn(2, 3, 1, 8, requires_grad=True)
    out, _ = cache_append(stored, torch.randn(2, 3, 5, 6), new, torch.randn(2, 3, 1, 6))
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(stored.grad, weights[..., :5, :]) and torch.equal(new.grad, weights[..., 5:, :])


# --------------------------------------------------------------------------------------------
# training through the compiled model
# --------------------------------------------------------------------------------------------
def test_backward_reaches_latent_weights_and_finetuning_lowers_loss():
    fam = FAMS["llama-gqa"]
    model = build_hf(fam).train()
    cm = compiled(model, options_for(fam))
    ids = prompt((2, 12), seed=5)
    loss = cm(ids, labels=ids, use_cache=False).loss
    loss.backward()
    latent = latent_modules(cm)
    assert len(latent) == 2
    for m in latent:
        for name in ("down", "up_key", "up_value"):
            grad = getattr(m, name).grad
            assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"
    k_proj = cm.model.layers[0].self_attn.k_proj.weight
    assert k_proj.grad is None, "the old k projection is no longer read"
    opt = torch.optim.AdamW([*cm.parameters(), *latent.parameters()], lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = cm(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], f"loss did not go down: {losses}"
    assert counters["stats"]["unique_graphs"] <= 2          # one forward graph (+ none per step)
    assert counters["mla"]["factorisations"] == 2


# --------------------------------------------------------------------------------------------
# options, refusals, registration
# --------------------------------------------------------------------------------------------
def test_unknown_option_is_a_clear_error():
    model = build_hf(FAMS["llama-gqa"])
    with pytest.raises(Exception, match=r"unknown option\(s\) \['d_kvv'\].*valid options.*d_kv.*inner"):
        compiled(model, {"d_kvv": 4})(prompt((1, 4)))


def test_options_map_onto_config():
    opts = parse_options({"d_kv": 8, "rope_freqs": 4, "rope_strategy": "uniform", "inner": "eager"})
    assert opts.config == MLAConfig(d_kv=8, rope_freqs=4, rope_strategy="uniform", best_effort=True)
    assert opts.inner == "eager" and parse_options(None).inner == "inductor"
    with pytest.raises(ValueError, match="inner must be one of"):
        parse_options({"inner": "tvm"})
    with pytest.raises(ValueError, match="calibration tokens"):
        parse_options({"d_kv": 8, "rope_freqs": 4, "rope_strategy": "2-norm"})
    with pytest.raises(ValueError, match="d_kv must be a positive integer"):
        parse_options({"d_kv": 0})


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.net(x).softmax(-1)


def test_model_without_attention_runs_unchanged_with_one_warning():
    torch.manual_seed(0)
    model = _MLP()
    x = torch.randn(4, 16)
    compiled_model = torch.compile(model, backend="mla", options={"inner": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled_model(x)
        got_again = compiled_model(x)
    assert torch.equal(got, model(x)) and torch.equal(got_again, got)
    msgs = [str(w.message) for w in caught if "mla backend" in str(w.message)]
    assert len(msgs) == 1 and "no attention found" in msgs[0], msgs


def test_entry_point_works_without_importing_mla_pass(tmp_path):
    """The design card's line in a fresh interpreter: the backend comes from the entry point."""
    script = textwrap.dedent("""
        import sys, torch
        from transformers import AutoModelForCausalLM, LlamaConfig
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        ids = torch.randint(0, 128, (1, 6))
        assert "mla_pass" not in sys.modules
        compiled = torch.compile(model, backend="mla", options={"d_kv": 4, "rope_freqs": 2, "inner": "eager"})
        with torch.no_grad():
            got = compiled(ids).logits
        import mla_pass
        want = mla_pass.convert(model, mla_pass.MLAConfig(d_kv=4, rope_freqs=2), progress=False)(ids)
        print("max_diff", (got - want).abs().max().item())
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    diff = float(done.stdout.split("max_diff")[-1])
    assert diff <= EAGER_TOL


# --------------------------------------------------------------------------------------------
# the real model
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_logits_and_generation(smollm2):
    model, tokenizer = smollm2
    options = {"d_kv": 16, "rope_freqs": 4, "inner": "eager"}
    mla = mla_pass.convert(model, config_of(options), progress=False)
    ids = tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    cm = compiled(model, options)
    cm.generation_config.eos_token_id = None
    with torch.no_grad():
        d = max_diff(cm(ids).logits, mla(ids))
    assert d <= EAGER_TOL, f"SmolLM2: compiled vs convert max |diff| = {d:.2e}"
    torch._dynamo.reset()
    counters.clear()
    out = cm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                      pad_token_id=0, return_dict_in_generate=True)
    want = mla.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert torch.equal(out.sequences, want), tokenizer.batch_decode(torch.cat([out.sequences, want]))
    tokens = ids.shape[1] + NEW_TOKENS - 1
    assert cache_bytes(out.past_key_values) == mla.kv_cache_bytes_per_token(torch.float32) * tokens
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= MAX_GRAPHS and not counters["graph_break"]
    # the 30 factorisations of the first compiled call served every generation graph
    assert counters["mla"]["factorisations"] == 0 and counters["mla"]["reused"] == 30 * graphs
