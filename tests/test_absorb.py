"""absorb.absorb_projections: W_uk and W_uv folded into the query and output projections of the
exported step program compute what the unfolded program computes, for every family."""
from __future__ import annotations

import pytest
import torch
from test_families import FAMILIES, FAMILY_IDS, build_hf

import mla_pass
from mla_pass import MLAConfig
from mla_pass.export.onnx import _absorbed_step
from mla_pass.lowering.absorb import absorb_projections
from mla_pass.math.absorption import absorbed_output, absorbed_query

TOL = 1e-4   # fp32 logits, a 2-layer model: the folded products round differently from two matmuls


def _step_inputs(mla, vocab: int, past_len: int = 5, new: int = 3):
    """(ids, positions, mask, *past) for the step program: a left-padded batch of 2 over a past
    the program itself wrote."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, past_len + new), generator=gen)
    mask = torch.ones(2, past_len + new, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    empty = [torch.zeros(mla.plans[c.site].cache_shape(c.kind, 2, 0)) for c in mla.cache_spec]
    _, *past = mla.step(ids[:, :past_len], pos[:, :past_len], mask[:, :past_len], *empty)
    return ids[:, past_len:], pos[:, past_len:], mask, *past


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("compressed", [False, True], ids=["full-rank", "compressed"])
def test_absorbed_projections_compute_the_same_step(family, compressed):
    """Full rank with every rotary frequency, and d_kv=4 with 2 frequencies (none where the model
    has no RoPE): each folded program equals its unfolded one (which the family tests hold to HF)."""
    config = MLAConfig(d_kv=4, rope_freqs=min(2, family.rotary_pairs)) if compressed else MLAConfig()
    model = build_hf(family)
    mla = mla_pass.convert(model, config, progress=False)
    step = _absorbed_step(mla)
    args = _step_inputs(mla, model.config.vocab_size)
    with torch.no_grad():
        want = step(*args)
        report = absorb_projections(step, args)
        got = step(*args)
    assert report == {"sites": model.config.num_hidden_layers, "left": {}}, report
    for w, g in zip(want, got):
        assert g.shape == w.shape
        err = (g - w).abs().max().item()
        assert err <= TOL * max(1.0, w.abs().max().item()), f"{family.name}: {err:.2e}"
    # the model's own query and output projections are gone from the program
    attention_weights = [n.target for n in step.graph.nodes if n.op == "get_attr" and "mlp" not in n.target
                         and any(k in n.target for k in ("q_proj", "o_proj", "dense", "c_proj", "c_attn", "qkv"))]
    assert attention_weights == [], attention_weights


def test_sites_that_are_not_the_multi_query_form_are_left_with_the_reason():
    model = build_hf(FAMILIES[1])
    mla = mla_pass.convert(model, MLAConfig(d_kv=4, rope_freqs=2), progress=False)
    step = _absorbed_step(mla)
    args = _step_inputs(mla, model.config.vocab_size)
    next(m for m in step.modules() if hasattr(m, "plan")).form = "decompressed"
    with torch.no_grad():
        want = step(*args)
        report = absorb_projections(step, args)
        got = step(*args)
    assert report["sites"] == model.config.num_hidden_layers - 1
    assert list(report["left"].values()) == ["runs the decompressed form"]
    torch.testing.assert_close(got[0], want[0], atol=TOL, rtol=TOL)


def test_the_folded_weights_are_the_products_of_the_two_maps():
    torch.manual_seed(0)
    h, n_kv, dh, c, x_dim, v = 4, 2, 6, 5, 7, 3
    w_q, b_q = torch.randn(h, dh, x_dim, dtype=torch.float64), torch.randn(h, dh, dtype=torch.float64)
    nope = torch.tensor([[0, 2, 3, 5]] * h)
    up_key = torch.randn(n_kv, 4, c, dtype=torch.float64)
    kv_of = torch.tensor([0, 0, 1, 1])
    x = torch.randn(x_dim, dtype=torch.float64)
    a, a0 = absorbed_query(w_q, b_q, nope, up_key, kv_of, 0.5)
    q = torch.einsum("hdx,x->hd", w_q, x) + b_q
    want = torch.stack([0.5 * q[i, nope[i]] @ up_key[kv_of[i]] for i in range(h)])
    torch.testing.assert_close((a @ x + a0).reshape(h, c), want)
    w_o, b_o = torch.randn(x_dim, h, v, dtype=torch.float64), torch.randn(x_dim, dtype=torch.float64)
    up_value, b_value = torch.randn(n_kv, v, c, dtype=torch.float64), torch.randn(n_kv, v, dtype=torch.float64)
    o = torch.randn(h, c, dtype=torch.float64)
    bw, bb = absorbed_output(w_o, b_o, up_value, b_value, kv_of)
    heads = torch.stack([up_value[kv_of[i]] @ o[i] + b_value[kv_of[i]] for i in range(h)])
    torch.testing.assert_close(bw @ o.reshape(-1) + bb, torch.einsum("yhv,hv->y", w_o, heads) + b_o)


@pytest.mark.parametrize("family", [FAMILIES[1], FAMILIES[3]], ids=["llama-gqa", "qwen2"])
def test_the_fitted_map_for_dropped_rotary_pairs_folds_into_the_query(family):
    model = build_hf(family)
    tokens = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    mla = mla_pass.convert(model, MLAConfig(d_kv=4, rope_freqs=2, nope_fit="attention"), calibration=tokens,
                           progress=False)
    step = _absorbed_step(mla)
    assert any(getattr(m, "query_nope_mix", None) is not None for m in step.modules())
    args = _step_inputs(mla, model.config.vocab_size)
    with torch.no_grad():
        want = step(*args)
        assert absorb_projections(step, args)["sites"] == model.config.num_hidden_layers
        got = step(*args)
    torch.testing.assert_close(got[0], want[0], atol=TOL, rtol=TOL)
