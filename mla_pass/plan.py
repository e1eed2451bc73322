"""Per-site choices (which pairs stay rotated, the latent width) and the weights they imply."""
from __future__ import annotations

import torch

from .config import MLAConfig
from .latent_attention import LatentAttention, SitePlan
from .match import AttentionSite
from .math.nope_fit import fit_maps, group_sum
from .math.rope import select_pairs, two_norm_scores
from .math.svd import factorize_kv, full_latent_dim, refit_up, split_key_width


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
    if strategy == "auto":        # unresolved (e.g. the compiler backend): measured if measured, else high
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


@torch.no_grad()
def initialise(module: LatentAttention, site: AttentionSite, gram: torch.Tensor | None = None,
               damping: float = 1e-2, activation_aware: bool = True, refit: bool = False,
               nope_maps: torch.Tensor | None = None) -> None:
    """Fill a module's weights from the site's pretrained K/V projections: SVD (activation-aware
    when ``gram``, the mean x·xᵀ of the projections' input, is given and ``activation_aware``),
    then optionally a least-squares refit of the up-projections on ``gram``; ``nope_maps``
    [H, P, 2, 2] (from ``plan.nope_maps``) fill the query map of the dropped pairs."""
    p, w = module.plan, site.weights
    rope_dims = module.rope_dims                                   # [Hkv, R]
    nope_dims = module.nope_dims                                   # [Hkv, N]
    idx = lambda t, dims: torch.stack([t[j, dims[j]] for j in range(p.n_kv_heads)])  # noqa: E731
    w_key_nope = idx(w.w_key, nope_dims)                           # [Hkv, N, D]
    low = factorize_kv(w_key_nope, w.w_value, p.latent_dim, p.svd, gram=gram if activation_aware else None,
                       damping=damping)
    if refit:
        if gram is None:
            raise ValueError("refit needs the activation Gram matrix from calibration")
        if p.svd == "joint":
            low.up_key, low.up_value = refit_up(w_key_nope, w.w_value, low.down, gram)
        else:                   # split: keys read only the first c_k latent values, values the rest
            c_k = split_key_width(w_key_nope.shape[0] * w_key_nope.shape[1], p.hidden, p.latent_dim)
            none_v, none_k = w.w_value[:, :0], w_key_nope[:, :0]
            low.up_key[..., :c_k] = refit_up(w_key_nope, none_v, low.down[:c_k], gram)[0]
            low.up_value[..., c_k:] = refit_up(none_k, w.w_value, low.down[c_k:], gram)[1]
    module.down.copy_(low.down)
    module.up_key.copy_(low.up_key)
    module.up_value.copy_(low.up_value)
    if module.key_bias is not None:
        module.key_bias.copy_(idx(w.b_key, nope_dims))
    if module.value_bias is not None:
        module.value_bias.copy_(w.b_value)
    if p.key_norm:
        norm = site.key_norm_weights
        module.key_norm_weight.copy_(norm.full_weight.reshape(-1, p.hidden))
        if module.key_norm_bias is not None:
            module.key_norm_bias.copy_(norm.full_bias.reshape(-1))
    if module.query_nope_mix is not None:
        if nope_maps is None:
            raise ValueError(f"{p.layer}: the plan fits the dropped rotary pairs (nope_fit) but no fit was given")
        _fill_query_nope_mix(module, nope_maps)
    if module.rope_key is not None:
        module.rope_key.weight.copy_(idx(w.w_key, rope_dims).reshape(-1, p.hidden))
        if module.rope_key.bias is not None:
            module.rope_key.bias.copy_(idx(w.b_key, rope_dims).reshape(-1))


def _fill_query_nope_mix(module: LatentAttention, maps_HP22: torch.Tensor) -> None:
    """q' = Mᵀq on each dropped pair (d0, d1): q'0 = M00·q0 + M10·q1, q'1 = M11·q1 + M01·q0, written
    as (self, partner) coefficients at the pair's positions among each query head's nope dims."""
    mix = torch.zeros_like(module.query_nope_mix, dtype=torch.float64)
    mix[..., 0] = 1.0
    for h, k, i0, i1 in module.dropped_pair_positions():
        m = maps_HP22[h, k].double()
        mix[h, i0] = torch.stack([m[0, 0], m[1, 0]])
        mix[h, i1] = torch.stack([m[1, 1], m[0, 1]])
    module.query_nope_mix.copy_(mix)
