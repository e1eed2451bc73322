"""Per-site choices (which pairs stay rotated, the latent width) and the weights they imply."""
from __future__ import annotations

import torch

from ..config import MLAConfig
from ..frontend.match import AttentionSite
from ..math.nope_fit import fit_maps, group_sum
from ..math.rope import select_pairs, two_norm_scores
from ..math.svd import full_latent_dim
from ..modules.site_plan import SitePlan


class PlanError(ValueError):
    pass


def pair_errors(site: AttentionSite, config: MLAConfig, site_stats) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(error, energy) [Hkv, P] of dropping each rotary pair, summed over each group's query heads:
    with ``nope_fit``, the error left after the fitted replacement; else that of scoring the raw,
    unrotated pair. None when calibration did not measure them."""
    if site_stats is None:
        return None
    if config.fits_nope and config.nope_fit in site_stats.nope_moments:
        fit = fit_maps(site_stats.nope_moments[config.nope_fit], config.nope_map)
        n_kv = site.n_kv_heads
        return (group_sum(fit.fitted_error, site.kv_head_of_query, n_kv),
                group_sum(fit.energy, site.kv_head_of_query, n_kv))
    if site_stats.pair_score_error is not None:
        return site_stats.pair_score_error, site_stats.pair_score_energy
    return None


def nope_maps(site: AttentionSite, config: MLAConfig, stats) -> torch.Tensor | None:
    """The fitted maps M [H, P, 2, 2] per query head and rotary pair (``math.nope_fit``), or None."""
    if not config.fits_nope or stats is None or site.index not in stats.sites:
        return None
    moments = stats.sites[site.index].nope_moments.get(config.nope_fit)
    return None if moments is None else fit_maps(moments, config.nope_map).maps


def kept_pairs(site: AttentionSite, config: MLAConfig, stats, keep: int) -> list[list[int]]:
    """Indices (into ``site.rope.pairs``) of the pairs that stay rotated, per kv head."""
    n_pairs = site.rope.n_pairs
    if keep > n_pairs:
        raise PlanError(f"rope_freqs={keep} is more than the {n_pairs} rotary frequency pairs "
                        f"{site.layer} rotates per head; use at most {n_pairs} (or None to keep all)")
    scores = None
    site_stats = stats.sites.get(site.index) if stats is not None else None
    strategy = config.rope_strategy
    if strategy == "auto":        # a direct call with an unresolved config (the pass resolves it first)
        strategy = "score-error" if pair_errors(site, config, site_stats) is not None else "high"
    if strategy in ("2-norm", "score-error") and keep < n_pairs:
        if strategy == "2-norm":
            if site_stats is None or site_stats.query_pair_norms is None:
                raise PlanError("rope_strategy='2-norm' ranks frequencies on real activations: pass calibration "
                                "token ids to convert(..., calibration=ids)")
            scores = two_norm_scores(site_stats.query_pair_norms, site_stats.key_pair_norms, site.kv_head_of_query)
        else:
            errors = pair_errors(site, config, site_stats)
            if errors is None:
                raise PlanError("rope_strategy='score-error' measures frequencies on real activations: pass "
                                "calibration token ids to convert(..., calibration=ids)")
            scores = errors[0]
    return select_pairs(strategy, site.rope.speeds, keep, site.n_kv_heads, scores)


def plan_site(site: AttentionSite, config: MLAConfig, stats, keep: int | None = None,
              latent: int | None = None) -> SitePlan:
    """The site's plan; ``keep`` (rotary pairs per kv head) and ``latent`` (latent width) override
    the config's ``rope_freqs`` and ``d_kv`` (a budget allocation sets them per site)."""
    rope = site.rope
    n_pairs = rope.n_pairs
    if keep is None:
        keep = n_pairs if config.rope_freqs is None else config.rope_freqs
    chosen = kept_pairs(site, config, stats, keep)
    rope_dims = [sorted(d for k in pairs for d in rope.pairs[k]) for pairs in chosen]
    rows_key = site.n_kv_heads * (site.head_dim - 2 * keep)
    rows_value = site.n_kv_heads * site.value_dim
    hidden = site.weights.w_key.shape[-1]
    full = full_latent_dim(rows_key, rows_value, hidden, config.svd)
    if latent is not None:
        if not 0 <= latent <= full:
            raise PlanError(f"latent width {latent} at {site.layer} is outside [0, {full}]")
    elif config.d_kv is None:
        latent = full
    else:
        latent = config.d_kv * site.n_kv_heads
        if latent > full:
            raise PlanError(f"d_kv={config.d_kv} gives a latent of {latent} at {site.layer}, above the full rank "
                            f"{full} of its K/V projections; use d_kv <= {full // site.n_kv_heads} "
                            "(or None for full rank)")
    return SitePlan(
        index=site.index, layer=site.layer, n_heads=site.n_heads, n_kv_heads=site.n_kv_heads,
        head_dim=site.head_dim, value_dim=site.value_dim, hidden=hidden, latent_dim=latent,
        rope_dims=rope_dims, rotated_dims=sorted(d for pair in rope.pairs for d in pair),
        kv_head_of_query=list(site.kv_head_of_query), scale=float(site.scale), softcap=site.core.softcap,
        is_causal=site.core.is_causal, query_raw_layout=site.raw_layouts["query"], key_raw_layout=site.raw_layouts["key"],
        key_bias=site.weights.b_key is not None, value_bias=site.weights.b_value is not None, svd=config.svd,
        key_norm=site.key_norm.group if site.key_norm else None,
        key_norm_eps=site.key_norm.eps if site.key_norm else 0.0,
        key_norm_bias=bool(site.key_norm and site.key_norm_weights.full_bias is not None),
        nope_pairs=[list(pair) for pair in rope.pairs] if config.fits_nope and keep < n_pairs else None)


