"""Per-site choices (which rope slots stay rotated, how pairs mix across kv heads, the latent width)."""
from __future__ import annotations

import torch

from ..config import MLAConfig
from ..frontend.match import AttentionSite
from ..math.nope_fit import fit_maps, group_sum
from ..math.rope import mixing_matrices, select_pairs, slot_errors, two_norm_scores
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


def mixes_rope(site: AttentionSite, config: MLAConfig, stats) -> bool:
    """Whether this site's slots mix each rotary pair across kv heads: ``rope_mix="pca"`` with the
    calibration moments at hand, more than one kv head, and keys not RMS-normalised per head (a
    per-head scale does not commute with the mix)."""
    site_stats = stats.sites.get(site.index) if stats is not None else None
    return (config.rope_mix == "pca" and site.n_kv_heads > 1 and site_stats is not None
            and site_stats.slot_score_error is not None and not (site.key_norm and site.key_norm.group == "head"))


def rope_mixing(site: AttentionSite, stats, mixed: bool = True) -> torch.Tensor:
    """U_k per rotary pair [P, Hkv, Hkv] float64: with ``mixed`` (``SitePlan.rope_mixed``), the
    eigenvectors of each pair's calibration key second moment across kv heads, else the identity."""
    if mixed:
        return mixing_matrices(stats.sites[site.index].key_mix_moments)
    return torch.eye(site.n_kv_heads, dtype=torch.float64).repeat(site.rope.n_pairs, 1, 1)


def ranked_slots(site: AttentionSite, config: MLAConfig, stats, mix: torch.Tensor) -> list[tuple[int, int]]:
    """Every slot (pair k, component j) of a mixing site, most costly to drop first (the exact
    score error with U's weights, ``math.rope.slot_errors``)."""
    errors = slot_errors(stats.sites[site.index].slot_score_error, mix, site.kv_head_of_query)     # [P, Hkv]
    order = torch.argsort(errors.reshape(-1), descending=True, stable=True).tolist()
    return [divmod(i, site.n_kv_heads) for i in order]


def choose_slots(site: AttentionSite, config: MLAConfig, stats, n_slots: int) -> list[list[int]]:
    """The ``n_slots`` kept rope slots [[k, j], …] sorted. Mixing sites take the best slots over all
    (k, j); the others keep ``n_slots / Hkv`` pairs per kv head (``kept_pairs``; slot (k, j) is kv
    head j's pair k), the MHA2MLA layout."""
    n_kv, n_pairs = site.n_kv_heads, site.rope.n_pairs
    if not 0 <= n_slots <= n_kv * n_pairs:
        raise PlanError(f"{n_slots} rope slots at {site.layer}: it has {n_kv * n_pairs} ({n_pairs} rotary pairs "
                        f"× {n_kv} kv heads)")
    if mixes_rope(site, config, stats):
        return sorted([k, j] for k, j in ranked_slots(site, config, stats, rope_mixing(site, stats))[:n_slots])
    if n_slots % n_kv:
        raise PlanError(f"{n_slots} rope slots at {site.layer} do not split evenly over its {n_kv} kv heads "
                        "(only mixed slots, rope_mix='pca', take any number)")
    chosen = kept_pairs(site, config, stats, n_slots // n_kv)
    return sorted([k, j] for j, pairs in enumerate(chosen) for k in pairs)


def plan_site(site: AttentionSite, config: MLAConfig, stats, slots: int | None = None,
              latent: int | None = None) -> SitePlan:
    """The site's plan; ``slots`` (rope slots kept, 2 cached values each) and ``latent`` (latent
    width) override the config's ``rope_freqs`` (Hkv slots per frequency kept) and ``d_kv`` (a
    budget allocation sets them per site)."""
    rope = site.rope
    n_pairs = rope.n_pairs
    if config.rope_freqs is not None and config.rope_freqs > n_pairs:
        raise PlanError(f"rope_freqs={config.rope_freqs} is more than the {n_pairs} rotary frequency pairs "
                        f"{site.layer} rotates per head; use at most {n_pairs} (or None to keep all)")
    if slots is None:
        slots = site.n_kv_heads * (n_pairs if config.rope_freqs is None else config.rope_freqs)
    all_kept = slots == site.n_kv_heads * n_pairs
    chosen = choose_slots(site, config, stats, slots)
    mixed = mixes_rope(site, config, stats) and not all_kept
    rows_key = site.n_kv_heads * site.head_dim - 2 * slots
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
        rope_pairs=[list(pair) for pair in rope.pairs], rope_slots=chosen,
        rotated_dims=sorted(d for pair in rope.pairs for d in pair),
        kv_head_of_query=list(site.kv_head_of_query), scale=float(site.scale), softcap=site.core.softcap,
        is_causal=site.core.is_causal, query_raw_layout=site.raw_layouts["query"], key_raw_layout=site.raw_layouts["key"],
        key_bias=site.weights.b_key is not None, value_bias=site.weights.b_value is not None, svd=config.svd,
        key_norm=site.key_norm.group if site.key_norm else None,
        key_norm_eps=site.key_norm.eps if site.key_norm else 0.0,
        key_norm_bias=bool(site.key_norm and site.key_norm_weights.full_bias is not None),
        nope_pairs=[list(pair) for pair in rope.pairs] if config.fits_nope and not all_kept and not mixed else None,
        rope_mixed=mixed)
