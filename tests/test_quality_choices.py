"""Training-free choices: score-error statistics and selection, kv_budget allocation, least-squares refit."""
import math
import os
import random

import pytest
import torch
from helpers import hf_rotated_heads, tiny_llama, tiny_qwen2

import mla_pass
from mla_pass import MLAConfig
from mla_pass.frontend.capture import capture
from mla_pass.frontend.sites import find_sites
from mla_pass.math.budget import BudgetError, SiteChoices, allocate
from mla_pass.math.rope import select_pairs
from mla_pass.math.svd import factorize_kv, refit_up
from mla_pass.plan.allocate import allocate_budget
from mla_pass.plan.calibrate import collect

torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))


def _calibration(n=4, length=24, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_stats():
    """A tiny Llama's sites with every calibration statistic (one capture for several tests)."""
    model = tiny_llama()
    captured = capture(model)
    sites, _ = find_sites(captured)
    stats = collect(captured.gm, sites, _calibration(), captured.takes_positions, rope_norms=True, gram=True,
                    score_error=True, batch_size=3, progress=False)             # batches of 3 and 1
    return model, sites, stats


# -- score error ---------------------------------------------------------------------------------
def _direct_score_errors(model, tokens, pairs):
    """For each layer: Σ_{h in group j} Σ_{causal m ≥ n} (q_rot_p·k_rot_p − q_raw_p·k_raw_p)² / #pairs,
    computed on full L×L score matrices from the HF attention module's own projections and RoPE."""
    out = []
    for q, q_rot, k, k_rot in hf_rotated_heads(model, tokens):
        b, _, s, _ = q.shape
        n_kv, group = k.shape[1], q.shape[1] // k.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        err = torch.zeros(n_kv, len(pairs), dtype=torch.float64)
        for h in range(q.shape[1]):
            j = h // group
            for p, dims in enumerate(pairs):
                dims = list(dims)
                rot = q_rot[:, h][..., dims] @ k_rot[:, j][..., dims].transpose(-1, -2)
                raw = q[:, h][..., dims] @ k[:, j][..., dims].transpose(-1, -2)
                err[j, p] += ((rot - raw)[:, causal] ** 2).sum()
        out.append(err / (b * s * (s + 1) / 2))
    return out


def test_score_error_statistics_equal_a_direct_computation(llama_stats):
    model, sites, stats = llama_stats
    tokens = _calibration()
    half = sites[0].head_dim // 2
    assert sites[0].rope.pairs == [(i, i + half) for i in range(half)]
    direct = _direct_score_errors(model, tokens, sites[0].rope.pairs)
    for site, want in zip(sites, direct):
        got = stats.sites[site.index].pair_score_error
        assert got.shape == want.shape == (2, half)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-12), (got - want).abs().max()
        assert (stats.sites[site.index].pair_score_energy >= 0).all()
    # the slowest pair barely turns over 24 positions; the fastest turns most: its error is larger
    assert (direct[0][:, 0] > direct[0][:, -1]).all()


def test_score_error_strategy_keeps_the_largest_errors():
    from mla_pass.pipeline import build

    model = tiny_qwen2()
    tokens = _calibration()
    captured = capture(model)
    sites, _ = find_sites(captured)
    stats = collect(captured.gm, sites, tokens, captured.takes_positions, rope_norms=False, gram=False,
                    score_error=True, progress=False)
    mla = build(captured, MLAConfig(rope_freqs=3, rope_strategy="score-error", nope_fit="none", rope_mix="none"),
                calibration=tokens, progress=False)
    for site in sites:
        err = stats.sites[site.index].pair_score_error
        plan = mla.plans[site.index]
        for j, dims in enumerate(plan.rope_dims_per_kv_head):
            want = sorted(torch.topk(err[j], 3).indices.tolist())
            assert dims == sorted(d for p in want for d in site.rope.pairs[p]), (j, dims, want)
    speeds = [1.0, 0.5, 0.25]
    assert select_pairs("score-error", speeds, 3, 2) == [[0, 1, 2], [0, 1, 2]]     # all kept: no ranking needed


# -- budget allocation ----------------------------------------------------------------------------
def _cached_values(mla):
    return sum(p.cached_values_per_token for p in mla.plans.values())


def _original_values(mla):
    return sum(r.original_values_per_token for r in mla.report)


@pytest.mark.parametrize("seed", range(3))
def test_budget_is_never_exceeded(seed):
    rng = random.Random(seed)
    factory = rng.choice([tiny_llama, tiny_qwen2])
    model = factory()
    budget = round(rng.uniform(0.15, 0.9), 3)
    cfg = MLAConfig(kv_budget=budget, activation_aware=rng.random() < 0.5, svd=rng.choice(["joint", "split"]),
                    rope_strategy=rng.choice(["high", "score-error", "2-norm"]),
                    rope_freqs=rng.choice([None, None, 1, 2]))
    try:
        mla = mla_pass.convert(model, cfg, calibration=_calibration(seed=seed), progress=False)
    except ValueError as e:          # a budget below the minimum for this draw is a clear error too
        assert "below the minimum" in str(e), e
        return
    used, original = _cached_values(mla), _original_values(mla)
    assert used <= budget * original, (cfg, used, original)
    assert used > budget * original - 2 * len(mla.plans) - 1, "the allocation left much of the budget unused"
    if cfg.rope_freqs is not None:
        assert all(p.rope_width == 2 * cfg.rope_freqs * p.n_kv_heads for p in mla.plans.values())
    ids = _calibration(2, 9, seed=9)
    with torch.no_grad():
        assert torch.isfinite(mla(ids)).all()


def test_budget_below_the_minimum_names_it(llama_stats):
    _, sites, stats = llama_stats      # unmixed, per site: 2 kv heads × (2·1 rope + 1 latent) = 6 of 64 values → 0.0938
    unmixed = dict(rope_mix="none", rope_strategy="score-error")
    with pytest.raises(ValueError, match=r"below the minimum of 12 .*use kv_budget >= 0\.0938"):
        allocate_budget(sites, MLAConfig(kv_budget=0.05, **unmixed), stats)
    with pytest.raises(ValueError, match=r"rope_freqs=4 rotary pairs.*kv_budget >= 0\.2813"):
        allocate_budget(sites, MLAConfig(kv_budget=0.2, rope_freqs=4, **unmixed), stats)
    split = allocate_budget(sites, MLAConfig(kv_budget=0.0938, **unmixed), stats)
    assert split == {s.index: (2, 2) for s in sites}           # (slots, latent): one pair per kv head
    mixed = dict(rope_mix="pca", rope_strategy="score-error")  # per site: one slot (2 values) + 2 latent → 0.0625
    with pytest.raises(ValueError, match=r"below the minimum of 8 .*one rope slot.*use kv_budget >= 0\.0625"):
        allocate_budget(sites, MLAConfig(kv_budget=0.05, **mixed), stats)
    assert allocate_budget(sites, MLAConfig(kv_budget=0.0625, **mixed), stats) == {s.index: (1, 2) for s in sites}
    for budget in (0.1, 0.25, 0.5, 0.77, 1.0):
        for cfg in (MLAConfig(kv_budget=budget, **unmixed), MLAConfig(kv_budget=budget, **mixed),
                    MLAConfig(kv_budget=budget, activation_aware=True, svd="split", **mixed)):
            used = sum(2 * r + c for s, (r, c) in zip(sites, allocate_budget(sites, cfg, stats).values()))
            assert budget * 128 - 4 < used <= budget * 128, (cfg, used)


def test_full_budget_is_exact():
    model = tiny_llama()
    tokens = _calibration()
    mla = mla_pass.convert(model, MLAConfig(kv_budget=1.0, activation_aware=True), calibration=tokens, progress=False)
    assert _cached_values(mla) == _original_values(mla)
    with torch.no_grad():
        assert (mla(tokens) - model(tokens).logits).abs().max() < 1e-4


def test_budget_config_checks_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="either d_kv"):
        MLAConfig(d_kv=4, kv_budget=0.3)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        MLAConfig(kv_budget=1.5)
    with pytest.raises(ValueError, match="kv_budget=0.3 needs real activations"):
        mla_pass.convert(tiny_llama(), MLAConfig(kv_budget=0.3), progress=False)
    cfg = MLAConfig(kv_budget=0.3, rope_strategy="score-error", activation_aware=True, refit=True)
    assert MLAConfig.from_dict(cfg.to_dict()) == cfg
    mla = mla_pass.convert(tiny_qwen2(), cfg, calibration=_calibration(), progress=False)
    mla.save(tmp_path / "m")
    back = mla_pass.load(tmp_path / "m")
    assert back.config == mla.config == cfg.resolved(True) and back.plans == mla.plans
    ids = _calibration(2, 7, seed=3)
    with torch.no_grad():
        assert torch.equal(back(ids), mla(ids))


def test_allocate_prefers_where_loss_drops_most_and_fits():
    # site 0's loss falls steeply with latent width, site 1's barely: the budget goes to site 0
    steep = SiteChoices({1: torch.tensor([1.0, 0.5, 0.25, 0.12, 0.06, 0.03])}, rope_cost=2)
    flat = SiteChoices({1: torch.tensor([1.0, 0.99, 0.98, 0.97, 0.96, 0.95])}, rope_cost=2)
    (r0, c0), (r1, c1) = allocate([steep, flat], budget=2 + 2 + 6)
    assert (r0, r1) == (1, 1) and c0 + c1 == 6 and c0 >= 4
    with pytest.raises(BudgetError, match="minimum of 6"):
        allocate([steep, flat], budget=5)


@pytest.mark.parametrize("seed", range(5))
def test_allocate_random_tables(seed):
    g = torch.Generator().manual_seed(seed)
    sites = []
    for _ in range(4):
        options = {r: (torch.rand(1, generator=g) * 2 / (r + 1)).item() + torch.rand(12, generator=g).sort(
            descending=True).values for r in (1, 2, 4)}
        sites.append(SiteChoices(options, rope_cost=4, fixed_cost=int(torch.randint(0, 2, (1,), generator=g)),
                                 min_latent=2))
    minimum = sum(s.cheapest() for s in sites)
    for budget in (minimum, minimum + 7, minimum + 30, 500):
        picked = allocate(sites, budget)
        assert sum(s.cost(r, c) for s, (r, c) in zip(sites, picked)) <= budget
        assert all(c >= s.min_latent and c < s.losses[r].shape[0] for s, (r, c) in zip(sites, picked))


# -- least-squares refit --------------------------------------------------------------------------
def _weighted_error(wk, wv, down, up_k, up_v, gram):
    w = torch.cat([wk.reshape(-1, wk.shape[-1]), wv.reshape(-1, wv.shape[-1])]).double()
    up = torch.cat([up_k.reshape(-1, up_k.shape[-1]), up_v.reshape(-1, up_v.shape[-1])]).double()
    delta = w - up @ down.double()
    return torch.trace(delta @ gram.double() @ delta.T).item()


@pytest.mark.parametrize("rank", [2, 6, 12])
def test_refit_lowers_the_calibration_weighted_error_of_a_weight_only_svd(rank):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, generator=g) @ (torch.randn(24, 24, generator=g) * torch.logspace(0, -2, 24))
    gram = (x.T @ x / len(x)).double()
    wk, wv = torch.randn(2, 5, 24, generator=g), torch.randn(2, 6, 24, generator=g)
    low = factorize_kv(wk, wv, rank)
    up_k, up_v = refit_up(wk, wv, low.down, gram, ridge=0.0)
    before = _weighted_error(wk, wv, low.down, low.up_key, low.up_value, gram)
    after = _weighted_error(wk, wv, low.down, up_k, up_v, gram)
    assert after < before
    # optimal: a small move of the refit up-projection in any direction makes it worse
    for _ in range(3):
        bump = 1e-3 * torch.randn(up_k.shape, generator=g)
        assert _weighted_error(wk, wv, low.down, up_k + bump, up_v, gram) >= after


def test_refit_at_full_rank_stays_exact():
    model = tiny_llama()
    tokens = _calibration()
    mla = mla_pass.convert(model, MLAConfig(refit=True), calibration=tokens, progress=False)
    with torch.no_grad():
        assert (mla(tokens) - model(tokens).logits).abs().max() < 1e-4


@pytest.mark.parametrize("svd", ["joint", "split"])
def test_refit_lowers_the_site_error(llama_stats, svd):
    from mla_pass.modules.latent_attention import LatentAttention
    from mla_pass.plan.choose import plan_site
    from mla_pass.math.rope import split_key_weights
    from mla_pass.plan.initialise import initialise

    _, sites, stats = llama_stats
    for site in sites:
        plan = plan_site(site, MLAConfig(d_kv=3, rope_freqs=2, svd=svd), stats)
        errors = []
        for refit in (False, True):
            module = LatentAttention(plan)
            initialise(module, site, gram=stats.sites[site.index].gram, activation_aware=False, refit=refit)
            wk = split_key_weights(site.weights.w_key, None, plan.rope_pairs, module.rope_mix, plan.rope_slots)[0]
            errors.append(_weighted_error(wk, site.weights.w_value, module.down, module.up_key, module.up_value,
                                          stats.sites[site.index].gram))
        assert errors[1] < errors[0], errors


def test_refit_lowers_kl_of_the_published_recipe():
    model = tiny_llama()
    tokens = _calibration(8, 32)
    kls = []
    for refit in (False, True):
        mla = mla_pass.convert(model, MLAConfig(d_kv=3, rope_freqs=2, refit=refit), calibration=tokens,
                               progress=False)
        with torch.no_grad():
            ref = model(tokens).logits.log_softmax(-1)
            kls.append((ref.exp() * (ref - mla(tokens).log_softmax(-1))).sum(-1).mean().item())
    assert kls[1] < kls[0], kls
    assert math.isfinite(kls[1])


# -- defaults ---------------------------------------------------------------------------------------
def test_defaults_use_calibration_when_given_and_fall_back_without():
    cfg = MLAConfig(d_kv=2, rope_freqs=2)
    assert cfg.rope_strategy == "auto" and cfg.activation_aware is None and not cfg.needs_calibration
    assert cfg.benefits_from_calibration and not MLAConfig().benefits_from_calibration
    assert cfg.resolved(True) == MLAConfig(d_kv=2, rope_freqs=2, rope_strategy="score-error", activation_aware=True,
                                           nope_fit="none", rope_mix="pca")
    assert cfg.resolved(False) == MLAConfig(d_kv=2, rope_freqs=2, rope_strategy="high", activation_aware=False,
                                            nope_fit="none", rope_mix="none")
    assert MLAConfig().resolved(True) == MLAConfig(rope_strategy="high", activation_aware=False,   # exact: nothing to fit
                                                   nope_fit="none", rope_mix="none")
    assert MLAConfig(d_kv=2, rope_freqs=2, rope_mix="none").resolved(True).nope_fit == "attention-centered"
    model = tiny_llama()
    without = mla_pass.convert(model, cfg, progress=False)
    with_calibration = mla_pass.convert(model, cfg, calibration=_calibration(), progress=False)
    assert without.config == cfg.resolved(False) and with_calibration.config == cfg.resolved(True)
    tokens = _calibration(2, 16, seed=5)
    kl = []
    with torch.no_grad():
        ref = model(tokens).logits.log_softmax(-1)
        for mla in (without, with_calibration):
            kl.append((ref.exp() * (ref - mla(tokens).log_softmax(-1))).sum(-1).mean().item())
    assert kl[1] < kl[0], kl


# -- shared rope slots (pairs mixed across kv heads) -------------------------------------------------
def test_mixed_slots_keep_the_largest_mixed_errors_and_are_exact_with_every_slot_kept(llama_stats):
    """rope_mix='pca': the kept slots are the top-S of ``slot_errors`` under the eigenvector mixing;
    with every slot kept (any U) and full rank the logits are the original's; the cache holds 2
    values per slot, one set for every head."""
    from mla_pass.math.rope import mixing_matrices, slot_errors
    from mla_pass.pipeline import build

    model, sites, stats = llama_stats
    tokens = _calibration(2, 12, seed=4)
    mla = build(capture(model), MLAConfig(rope_freqs=3, rope_mix="pca"), stats=stats, progress=False)
    for site in sites:
        s, plan = stats.sites[site.index], mla.plans[site.index]
        mix = mixing_matrices(s.key_mix_moments)
        err = slot_errors(s.slot_score_error, mix, site.kv_head_of_query).reshape(-1)
        want = sorted(divmod(i, site.n_kv_heads) for i in torch.topk(err, 3 * site.n_kv_heads).indices.tolist())
        assert plan.rope_mixed and [tuple(x) for x in plan.rope_slots] == want
        assert plan.cache_shape("rope_key", 2, 5) == (2, 1, 5, 6 * site.n_kv_heads)
        module = mla.program.get_submodule(f"mla.{site.index}")
        assert torch.allclose(module.rope_mix, mix.to(module.rope_mix.dtype))
    # every slot kept, with the mixing forced on: still exact (RoPE commutes with U)
    from mla_pass.plan import build as plan_build
    original = plan_build.rope_mixing

    def always_mixed(site, stats_, mixed=True):
        return mixing_matrices(stats_.sites[site.index].key_mix_moments)
    try:
        plan_build.rope_mixing = always_mixed
        exact = build(capture(model), MLAConfig(rope_mix="pca"), stats=stats, progress=False)
    finally:
        plan_build.rope_mixing = original
    module = exact.program.get_submodule("mla.0")
    assert not torch.allclose(module.rope_mix, torch.eye(module.rope_mix.shape[-1]).expand_as(module.rope_mix))
    with torch.no_grad():
        assert (exact(tokens) - model(tokens).logits).abs().max() < 1e-4


def test_mixed_slots_beat_per_head_pairs_at_the_same_cache_size():
    """On a model whose kv heads share their rotary keys, mixing puts the shared part in one slot per
    pair: at the same rope cache the mixed conversion is closer to the original."""
    model = tiny_llama(n_kv=2, layers=2, seed=3)
    with torch.no_grad():          # make kv head 1's keys nearly a copy of kv head 0's
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight
            hd = w.shape[0] // 2
            w[hd:] = w[:hd] + 0.05 * torch.randn_like(w[:hd])
    tokens, held_out = _calibration(8, 32), _calibration(4, 32, seed=11)
    kls = {}
    for mix in ("none", "pca"):
        mla = mla_pass.convert(model, MLAConfig(rope_freqs=2, rope_mix=mix, nope_fit="none"), calibration=tokens,
                               progress=False)
        with torch.no_grad():
            ref = model(held_out).logits.log_softmax(-1)
            kls[mix] = (ref.exp() * (ref - mla(held_out).log_softmax(-1))).sum(-1).mean().item()
        assert mla.kv_cache_bytes_per_token() == mla_pass.convert(
            model, MLAConfig(rope_freqs=2, rope_mix="none", rope_strategy="high"), progress=False).kv_cache_bytes_per_token()
    assert kls["pca"] < kls["none"], kls
