"""``MLAConfig(kv_budget=...)``: how many rotary pairs and how wide a latent each site gets.

Per site and per candidate number r of rotary pairs kept (per kv head), calibration gives two
measured losses, each relative to what the site carries, so that sites and kinds compare:
- rope: Σ over dropped pairs of the mean squared attention-score change when the pair loses its
  rotation (``SiteStats.pair_score_error``; with ``nope_fit``, the error left after the fitted
  replacement), over the site's total pair score energy;
- latent: the energy of [W_k_nope; W_v]·x that a rank-c factorisation loses, over the energy of
  [W_k; W_v]·x: the tail of the (activation-weighted when ``activation_aware``) spectrum. A
  principal submatrix of one Gram matrix per site gives every r's spectrum.
``math.budget.allocate`` then picks (r, c) per site under the total.
"""
from __future__ import annotations

import math

import torch

from ..config import MLAConfig
from ..frontend.match import AttentionSite
from ..math.budget import BudgetError, SiteChoices, allocate
from ..math.svd import split_key_width


def rope_candidates(n_pairs: int) -> list[int]:
    """Numbers of rotary pairs tried per site: every count up to 8, then coarser (each costs an
    eigendecomposition)."""
    if n_pairs == 0:
        return [0]
    grid = set(range(1, min(n_pairs, 8) + 1)) | set(range(10, n_pairs + 1, 2 if n_pairs <= 16 else 4))
    return sorted(grid | {n_pairs})


@torch.no_grad()
def site_choices(site: AttentionSite, config: MLAConfig, stats) -> SiteChoices:
    from .choose import kept_pairs, pair_errors

    site_stats = stats.sites.get(site.index) if stats is not None else None
    w = site.weights
    n_kv, hd, vd = site.n_kv_heads, site.head_dim, site.value_dim
    hidden = w.w_key.shape[-1]
    w_all = torch.cat([w.w_key.reshape(n_kv * hd, hidden), w.w_value.reshape(n_kv * vd, hidden)]).double()
    if config.activation_aware and site_stats is not None and site_stats.gram is not None:
        g = site_stats.gram.double()
        g = g + config.damping * g.diagonal().mean().clamp(min=1e-12) * torch.eye(hidden, dtype=g.dtype)
        gram_rows = w_all @ g @ w_all.T                 # E‖W x‖² by row pairs (ridge as the SVD uses it)
    else:
        gram_rows = w_all @ w_all.T
    total = gram_rows.diagonal().sum().clamp(min=1e-30)
    if config.rope_freqs is not None:
        candidates = [config.rope_freqs]
    else:
        candidates = rope_candidates(site.rope.n_pairs)
    error, energy = pair_errors(site, config, site_stats) or (None, None)
    losses = {}
    for r in candidates:
        chosen = kept_pairs(site, config, stats, r)
        rope_loss = 0.0
        if error is not None and r < site.rope.n_pairs:
            dropped = torch.ones_like(error, dtype=torch.bool)
            for j, pairs in enumerate(chosen):
                dropped[j, pairs] = False
            rope_loss = float(error[dropped].sum() / energy.sum().clamp(min=1e-30))
        kept_dims = [{d for k in pairs for d in site.rope.pairs[k]} for pairs in chosen]
        key_rows = [j * hd + d for j in range(n_kv) for d in range(hd) if d not in kept_dims[j]]
        value_rows = list(range(n_kv * hd, n_kv * (hd + vd)))
        losses[r] = rope_loss + _latent_loss(gram_rows, key_rows, value_rows, hidden, config.svd) / total
    return SiteChoices(losses=losses, rope_cost=2 * n_kv, fixed_cost=_key_scale_values(site), min_latent=n_kv)


def _latent_loss(gram_rows, key_rows, value_rows, hidden: int, mode: str) -> torch.Tensor:
    """Energy lost at each latent width c = 0 .. full (joint: one spectrum; split: K and V halves)."""
    def tail(rows):
        if not rows:
            return torch.zeros(1, dtype=torch.float64)
        idx = torch.tensor(rows)
        ev = torch.linalg.eigvalsh(gram_rows[idx][:, idx]).flip(0).clamp(min=0)[:hidden]
        return torch.cat([ev.sum()[None], ev.sum() - ev.cumsum(0)])            # [rank + 1]
    if mode == "joint":
        return tail(key_rows + value_rows)
    t_k, t_v = tail(key_rows), tail(value_rows)
    full = (t_k.shape[0] - 1) + (t_v.shape[0] - 1)
    out = torch.empty(full + 1, dtype=torch.float64)
    for c in range(full + 1):
        c_k = split_key_width(len(key_rows), hidden, c)
        out[c] = t_k[c_k] + t_v[min(c - c_k, t_v.shape[0] - 1)]
    return out


def _key_scale_values(site: AttentionSite) -> int:
    return {None: 0, "head": site.n_kv_heads, "all": 1}[site.key_norm.group if site.key_norm else None]


def original_values(site: AttentionSite) -> int:
    return site.n_kv_heads * (site.head_dim + site.value_dim)


def allocate_budget(sites: list[AttentionSite], config: MLAConfig, stats) -> dict[int, tuple[int, int]]:
    """Site index → (rotary pairs kept per kv head, latent width), within ``config.kv_budget``
    of the original cache values per token of these sites."""
    original = sum(original_values(s) for s in sites)
    budget = math.floor(config.kv_budget * original + 1e-9)
    choices = [site_choices(s, config, stats) for s in sites]
    try:
        picked = allocate(choices, budget)
    except BudgetError:
        minimum = sum(c.cheapest() for c in choices)
        fraction = math.ceil(minimum / original * 1e4) / 1e4
        rope = (f"rope_freqs={config.rope_freqs} rotary pairs" if config.rope_freqs is not None
                else "one rotary pair")
        raise ValueError(f"kv_budget={config.kv_budget} keeps {budget:,} of {original:,} cached values per token, "
                         f"below the minimum of {minimum:,} ({rope} and one latent value per kv head at every "
                         f"site); use kv_budget >= {fraction}") from None
    return {s.index: rc for s, rc in zip(sites, picked)}
