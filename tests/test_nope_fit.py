"""Fitted replacement of dropped rotary pairs (MLAConfig.nope_fit): statistics, fit, application, exactness."""
import os

import pytest
import torch
from helpers import hf_rotated_heads, tiny_llama, tiny_qwen2

import mla_pass
from mla_pass import MLAConfig
from mla_pass.frontend.capture import capture
from mla_pass.frontend.sites import find_sites
from mla_pass.math.nope_fit import apply_to_query, fit_maps, group_sum, pair_fit_moments
from mla_pass.modules.latent_attention import LatentAttention
from mla_pass.pipeline import build
from mla_pass.plan.calibrate import collect

torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))


def _tokens(n=4, length=24, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _features(q, q_rot, k, k_rot, h, j, d0, d1):
    """[B, S, S, 5]: s = q_rot·k_rot and g_uv = q_u·k_v (uv = 00, 01, 10, 11) of pair (d0, d1) for every (m, n)."""
    d = [d0, d1]
    s = q_rot[:, h][..., d] @ k_rot[:, j][..., d].transpose(-1, -2)
    g = [q[:, h][:, :, None, d[u]] * k[:, j][:, None, :, d[v]] for u in range(2) for v in range(2)]
    return torch.stack([s, *g], dim=-1)


def _direct_moments(q, q_rot, k, k_rot, pairs, kv_map, weights_BHSS):
    out = torch.zeros(q.shape[1], len(pairs), 5, 5, dtype=torch.float64)
    for h, j in enumerate(kv_map):
        for p, (d0, d1) in enumerate(pairs):
            f = _features(q, q_rot, k, k_rot, h, j, d0, d1)
            out[h, p] = torch.einsum("bmn,bmni,bmnj->ij", weights_BHSS[:, h], f, f)
    return out


# -- pure math ------------------------------------------------------------------------------------
def _random_heads(seed=0, b=2, h=4, n_kv=2, s=11, d=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return r(b, h, s, d), r(b, h, s, d), r(b, n_kv, s, d), r(b, n_kv, s, d)


def test_running_sum_moments_equal_the_direct_sum():
    q, q_rot, k, k_rot = _random_heads()
    pairs, kv_map = [(i, i + 4) for i in range(4)], (0, 0, 1, 1)
    s = q.shape[2]
    got, count = pair_fit_moments(q, q_rot, k, k_rot, pairs, kv_map)
    want = _direct_moments(q, q_rot, k, k_rot, pairs, kv_map, torch.ones(s, s).tril().double().expand(2, 4, s, s))
    assert count == 2 * s * (s + 1) // 2
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-9), (got - want).abs().max()


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_attention_weighted_moments_equal_the_direct_sum(softcap):
    q, q_rot, k, k_rot = _random_heads(seed=1)
    pairs, kv_map, scale = [(2 * i, 2 * i + 1) for i in range(4)], (0, 1, 0, 1), 0.35
    got, count = pair_fit_moments(q, q_rot, k, k_rot, pairs, kv_map, "attention", scale, softcap)
    scores = q_rot @ k_rot[:, list(kv_map)].transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    s = q.shape[2]
    probs = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    want = _direct_moments(q, q_rot, k, k_rot, pairs, kv_map, probs)
    assert count == 2 * s
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"relative error {err:.2e} (float32 matmul) above 1e-5"


def test_centered_moments_are_the_attention_weighted_variance():
    q, q_rot, k, k_rot = _random_heads(seed=4)
    pairs, kv_map, scale = [(i, i + 4) for i in range(4)], (0, 0, 1, 1), 0.5
    got, count = pair_fit_moments(q, q_rot, k, k_rot, pairs, kv_map, "attention-centered", scale)
    s = q.shape[2]
    probs = (q_rot @ k_rot[:, list(kv_map)].transpose(-1, -2) * scale).masked_fill(
        ~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    want = torch.zeros_like(got)
    for h, j in enumerate(kv_map):
        for p, (d0, d1) in enumerate(pairs):
            f = _features(q, q_rot, k, k_rot, h, j, d0, d1)                       # [B, S, S, 3]
            centered = f - torch.einsum("bmn,bmni->bmi", probs[:, h], f)[:, :, None]
            want[h, p] = torch.einsum("bmn,bmni,bmnj->ij", probs[:, h], centered, centered)
    assert count == 2 * s
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"relative error {err:.2e} (float32 matmul) above 1e-5"
    with pytest.raises(ValueError, match="needs the site's score scale"):
        pair_fit_moments(q, q_rot, k, k_rot, pairs, kv_map, "attention-centered")


@pytest.mark.parametrize("form", ["rotation", "general"])
def test_fit_is_the_least_squares_solution_and_folds_into_the_query(form):
    q, q_rot, k, k_rot = _random_heads(seed=2)
    pairs, kv_map = [(i, i + 4) for i in range(4)], (0, 0, 1, 1)
    moments, count = pair_fit_moments(q, q_rot, k, k_rot, pairs, kv_map)
    fit = fit_maps(moments, form, ridge=0.0)
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    for h, j in enumerate(kv_map):
        for p, (d0, d1) in enumerate(pairs):
            f = _features(q, q_rot, k, k_rot, h, j, d0, d1)[:, causal].reshape(-1, 5)
            s, g = f[:, 0], f[:, 1:]                                     # g: q0k0, q0k1, q1k0, q1k1
            if form == "rotation":       # s ≈ a·q·k + b·(q1k0 − q0k1)
                features = torch.stack([g[:, 0] + g[:, 3], g[:, 2] - g[:, 1]], 1)
                a, b = torch.linalg.lstsq(features, s[:, None]).solution[:, 0]
                want = torch.stack([torch.stack([a, -b]), torch.stack([b, a])])
            else:
                want = torch.linalg.lstsq(g, s[:, None]).solution[:, 0].reshape(2, 2)
            assert torch.allclose(fit.maps[h, p], want, atol=1e-9), (h, p, fit.maps[h, p], want)
            resid = (s - g @ want.reshape(4)).pow(2).sum()
            assert torch.isclose(fit.fitted_error[h, p], resid, rtol=1e-8)
            assert torch.isclose(fit.identity_error[h, p], (s - g[:, 0] - g[:, 3]).pow(2).sum(), rtol=1e-8)
    assert (fit.fitted_error <= fit.identity_error + 1e-9).all()
    # q' = Mᵀq: scoring q' against the raw k is qᵀMk
    q_fit = apply_to_query(q, fit.maps, pairs)
    for h, j in enumerate(kv_map):
        d0, d1 = pairs[1]
        f = _features(q, q_rot, k, k_rot, h, j, d0, d1)
        got = q_fit[:, h][..., [d0, d1]] @ k[:, j][..., [d0, d1]].transpose(-1, -2)
        assert torch.allclose(got, f[..., 1:] @ fit.maps[h, 1].reshape(4), atol=1e-10)
    assert torch.equal(group_sum(fit.energy, kv_map, 2), fit.energy[[0, 2]] + fit.energy[[1, 3]])
    general = fit_maps(moments, "general", ridge=0.0)
    assert (general.fitted_error <= fit.fitted_error + 1e-9).all()       # the larger family fits at least as well


def test_an_unrotated_pair_fits_the_identity():
    q, _, k, _ = _random_heads(seed=3)
    moments, _ = pair_fit_moments(q, q, k, k, [(0, 4), (1, 5)], (0, 0, 1, 1))   # "rotated" = raw
    for form in ("rotation", "general"):
        fit = fit_maps(moments, form)
        assert torch.allclose(fit.maps, torch.eye(2, dtype=torch.float64).expand_as(fit.maps), atol=1e-5)
        assert (fit.fitted_error < 1e-6 * fit.energy).all()


# -- calibration and conversion on a tiny model ---------------------------------------------------
@pytest.fixture(scope="module")
def llama_moments():
    model = tiny_llama()
    captured = capture(model)
    sites, _ = find_sites(captured)
    stats = collect(captured.gm, sites, _tokens(), captured.takes_positions, rope_norms=False, gram=True,
                    score_error=True, nope_moments=("uniform", "attention", "attention-centered"), batch_size=3,
                    progress=False)
    return model, captured, sites, stats


def test_calibration_moments_equal_a_direct_computation(llama_moments):
    model, _, sites, stats = llama_moments
    tokens = _tokens()
    s = tokens.shape[1]
    for site, (q, q_rot, k, k_rot) in zip(sites, hf_rotated_heads(model, tokens)):
        pairs, kv_map = site.rope.pairs, site.kv_head_of_query
        causal = torch.ones(s, s).tril().double().expand(tokens.shape[0], q.shape[1], s, s)
        want = _direct_moments(q, q_rot, k, k_rot, pairs, kv_map, causal) / (tokens.shape[0] * s * (s + 1) / 2)
        got = stats.sites[site.index].nope_moments["uniform"]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-12), (got - want).abs().max()
        # the M = I error of the fit agrees with the score-error statistic (same sums, other route)
        fit = fit_maps(got)
        assert torch.allclose(group_sum(fit.identity_error, kv_map, site.n_kv_heads),
                              stats.sites[site.index].pair_score_error, rtol=1e-6, atol=1e-12)
        for w in ("attention", "attention-centered"):
            att = stats.sites[site.index].nope_moments[w]
            assert att.shape == got.shape == (q.shape[1], len(pairs), 5, 5) and torch.isfinite(att).all()


@pytest.mark.parametrize("weighting,form", [("uniform", "rotation"), ("uniform", "general"),
                                           ("attention-centered", "general")])
def test_fitted_map_lowers_the_calibration_score_error(llama_moments, weighting, form):
    """The converted module's own q_nope, scored against the raw keys over the calibration text,
    misses the rotated scores of the dropped pairs by less than with M = I (and by what the fit says)."""
    model, captured, sites, stats = llama_moments
    tokens = _tokens()
    errors = {}
    for fit_name in ("none", weighting):
        mla = build(capture(model), MLAConfig(rope_freqs=1, rope_strategy="high", nope_fit=fit_name, nope_map=form),
                    stats=stats, progress=False)
        total = 0.0
        for site, (q, q_rot, k, k_rot) in zip(sites, hf_rotated_heads(model, tokens)):
            module = mla.program.get_submodule(f"mla.{site.index}")
            assert (module.query_nope_mix is not None) == (fit_name != "none")
            q_in = q.float() if module.plan.query_raw_layout == "BHSD" else q.float().transpose(1, 2)
            with torch.no_grad():
                q_nope, _ = module.split_query(q_in, q_rot.float())            # [B, H, S, N]
            kept = module.plan.rope_dims_per_kv_head
            causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
            for h, j in enumerate(site.kv_head_of_query):
                for d0, d1 in site.rope.pairs:          # per dropped pair, as the fit minimises it
                    if d0 in kept[j]:
                        continue
                    cols = [d0, d1]
                    got = q_nope[:, h][..., cols].double() @ k[:, j][..., [d0, d1]].transpose(-1, -2)
                    want = q_rot[:, h][..., [d0, d1]] @ k_rot[:, j][..., [d0, d1]].transpose(-1, -2)
                    total += float(((want - got)[:, causal] ** 2).sum())
        errors[fit_name] = total / (tokens.shape[0] * tokens.shape[1] * (tokens.shape[1] + 1) / 2)
    assert errors[weighting] < 0.9 * errors["none"], errors
    if weighting == "uniform":      # the module applies exactly the fit whose error calibration predicts
        predicted = sum(float(fit_maps(stats.sites[s.index].nope_moments["uniform"], form).fitted_error[:, 1:].sum())
                        for s in sites)                                   # "high" keeps pair 0
        assert abs(errors["uniform"] - predicted) < 1e-3 * predicted, (errors, predicted)


def test_selection_uses_the_error_left_after_the_fit(llama_moments):
    model, _, sites, stats = llama_moments
    mla = build(capture(model), MLAConfig(rope_freqs=2, rope_strategy="score-error", nope_fit="attention"),
                stats=stats, progress=False)
    for site in sites:
        fit = fit_maps(stats.sites[site.index].nope_moments["attention"])
        err = group_sum(fit.fitted_error, site.kv_head_of_query, site.n_kv_heads)
        for j, dims in enumerate(mla.plans[site.index].rope_dims_per_kv_head):
            want = sorted(torch.topk(err[j], 2).indices.tolist())
            assert dims == sorted(d for p in want for d in site.rope.pairs[p])


@pytest.mark.parametrize("config", [MLAConfig(nope_fit="attention"), MLAConfig(rope_freqs=8, nope_fit="uniform"),
                                    MLAConfig(kv_budget=1.0, nope_fit="attention")],
                         ids=["default", "r=all", "budget=1"])
def test_all_pairs_kept_at_full_rank_stays_exact(config):
    model = tiny_qwen2()
    tokens = _tokens()
    mla = mla_pass.convert(model, config, calibration=tokens, progress=False)
    assert all(p.nope_pairs is None for p in mla.plans.values())
    with torch.no_grad():
        err = (mla(tokens) - model(tokens).logits).abs().max().item()
    assert err < 1e-4, f"max |Δlogit| {err:.2e} above 1e-4"


def test_fitted_model_decodes_consistently_and_round_trips(tmp_path):
    model = tiny_qwen2()
    mla = mla_pass.convert(model, MLAConfig(d_kv=4, rope_freqs=2, nope_fit="attention"), calibration=_tokens(),
                           progress=False)
    mods = [m for m in mla.modules() if isinstance(m, LatentAttention)]
    assert mods and all(m.query_nope_mix is not None for m in mods)
    assert any((m.query_nope_mix[..., 1].abs() > 1e-3).any() for m in mods), "no pair got a rotation part"
    ids, follow = _tokens(2, 6, seed=5), _tokens(2, 3, seed=6)
    with torch.no_grad():
        full = mla(torch.cat([ids, follow], dim=1))
        mask = torch.ones_like(ids)
        logits, *cache = mla.step_with_cache(ids, mask, mla.empty_cache(2))
        steps = [logits]
        for t in range(follow.shape[1]):          # one-token steps take the absorbed form
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            logits, *cache = mla.step_with_cache(follow[:, t:t + 1], mask, cache)
            steps.append(logits)
    err = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert err < 1e-4, f"cached decode vs full forward: max |Δlogit| {err:.2e} above 1e-4"
    mla.save(tmp_path / "m")
    back = mla_pass.load(tmp_path / "m")
    assert back.config == mla.config and back.plans == mla.plans
    with torch.no_grad():
        assert torch.equal(back(ids), mla(ids))


def test_statistics_without_the_moments_are_a_clear_error(llama_moments):
    model, _, _, stats = llama_moments
    with pytest.raises(ValueError, match=r"no nope_fit='attention' moments.*nope_moments=\('attention',\)"):
        build(capture(model), MLAConfig(rope_freqs=2, nope_fit="attention"),
              stats=type(stats)({i: type(s)(gram=s.gram, pair_score_error=s.pair_score_error,
                                            pair_score_energy=s.pair_score_energy) for i, s in stats.sites.items()}),
              progress=False)


def test_config_checks():
    with pytest.raises(ValueError, match="nope_fit must be one of"):
        MLAConfig(nope_fit="rotation-ish")
    with pytest.raises(ValueError, match="nope_map must be one of"):
        MLAConfig(nope_map="full")
    with pytest.raises(ValueError, match="nope_fit='uniform' needs real activations"):
        mla_pass.convert(tiny_llama(), MLAConfig(rope_freqs=2, rope_strategy="high", activation_aware=False,
                                                 nope_fit="uniform"), progress=False)
    assert MLAConfig.mha2mla(8).nope_fit == "none"
    cfg = MLAConfig(d_kv=4, rope_freqs=1, nope_fit="attention")
    assert cfg.needs_nope_moments and MLAConfig.from_dict(cfg.to_dict()) == cfg
    assert not MLAConfig(nope_fit="attention").needs_nope_moments        # nothing dropped: nothing to fit
    assert MLAConfig(rope_freqs=2).resolved(True).nope_fit == "none"     # the default with calibration mixes slots
    assert MLAConfig(rope_freqs=2, rope_mix="none").resolved(True).nope_fit == "attention-centered"
    assert MLAConfig(rope_freqs=2).resolved(False).nope_fit == "none"
    assert MLAConfig().resolved(True).nope_fit == "none"
    with pytest.raises(ValueError, match="nope_moments weightings"):
        model = tiny_llama(layers=1)
        captured = capture(model)
        collect(captured.gm, find_sites(captured)[0], _tokens(), captured.takes_positions, rope_norms=False,
                gram=False, nope_moments=("bogus",), progress=False)


def test_cli_option(tmp_path):
    import json

    from mla_pass.cli import main

    hf = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(str(hf))          # no tokenizer: nothing to calibrate with
    with pytest.raises(SystemExit, match="tokenizer"):
        main(["convert", str(hf), "--out", str(tmp_path / "a"), "--rope-freqs", "2", "--nope-fit", "uniform"])
    assert main(["convert", str(hf), "--out", str(tmp_path / "b"), "--rope-freqs", "2", "--nope-fit", "none"]) == 0
    assert json.loads((tmp_path / "b" / "mla_config.json").read_text())["config"]["nope_fit"] == "none"
