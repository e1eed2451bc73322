"""``MLAConfig(kv_budget=...)``: how many rope slots and how wide a latent each site gets.

Per site and per candidate number r of rope units kept (a mixed slot, 2 cached values, where the
site mixes its pairs across kv heads; else one pair per kv head, 2·Hkv values), calibration gives
two measured losses, each relative to what the site carries, so that sites and kinds compare:
- rope: Σ over dropped slots of the mean squared attention-score change when the slot loses its
  rotation (``math.rope.slot_errors``; unmixed with ``nope_fit``, the error left after the fitted
  replacement), over the site's total score energy;
- latent: the energy of [W_k_nope; W_v]·x that a rank-c factorisation loses, over the energy of
  [W_k; W_v]·x: the tail of the (activation-weighted when ``activation_aware``) spectrum of the
  key rows left after the kept slots are projected out (``math.rope.split_key_weights``).
``math.budget.allocate`` then picks (r, c) per site under the total.
"""
from __future__ import annotations

import math

import torch

from ..config import MLAConfig
from ..frontend.match import AttentionSite
from ..math.budget import BudgetError, SiteChoices, allocate
from ..math.rope import slot_errors, split_key_weights
from ..math.svd import split_key_width


def rope_candidates(n_pairs: int) -> list[int]:
    """Numbers of rotary pairs tried per site: every count up to 8, then coarser (each costs an
    eigendecomposition)."""
    if n_pairs == 0:
        return [0]
    grid = set(range(1, min(n_pairs, 8) + 1)) | set(range(10, n_pairs + 1, 2 if n_pairs <= 16 else 4))
    return sorted(grid | {n_pairs})


def slot_candidates(n_slots: int) -> list[int]:
    """Numbers of mixed rope slots tried per site: every count up to 24, then every 4th."""
    if n_slots == 0:
        return [0]
    return sorted(set(range(1, min(n_slots, 24) + 1)) | set(range(24, n_slots + 1, 4)) | {n_slots})


@torch.no_grad()
def site_choices(site: AttentionSite, config: MLAConfig, stats) -> SiteChoices:
    """The site's options in rope units (``units_per_slot`` converts them to slots)."""
    from .choose import kept_pairs, mixes_rope, pair_errors, ranked_slots, rope_mixing

    site_stats = stats.sites.get(site.index) if stats is not None else None
    w = site.weights
    n_kv, hd, vd = site.n_kv_heads, site.head_dim, site.value_dim
    hidden = w.w_key.shape[-1]
    mixed = mixes_rope(site, config, stats)
    mix = rope_mixing(site, stats, mixed)
    if config.activation_aware and site_stats is not None and site_stats.gram is not None:
        g = site_stats.gram.double()
        g = g + config.damping * g.diagonal().mean().clamp(min=1e-12) * torch.eye(hidden, dtype=g.dtype)
    else:
        g = torch.eye(hidden, dtype=torch.float64)
    w_key, w_value = w.w_key.double(), w.w_value.double().reshape(n_kv * vd, hidden)
    w_all = torch.cat([w_key.reshape(n_kv * hd, hidden), w_value])
    total = (w_all @ g @ w_all.T).diagonal().sum().clamp(min=1e-30)
    pairs = site.rope.pairs
    if mixed:
        ranked = ranked_slots(site, config, stats, mix)
        errors = slot_errors(site_stats.slot_score_error, mix, site.kv_head_of_query).reshape(-1)
        energy = slot_errors(site_stats.slot_score_energy, mix, site.kv_head_of_query).sum()
        candidates = ([n_kv * config.rope_freqs] if config.rope_freqs is not None
                      else slot_candidates(n_kv * site.rope.n_pairs))
    else:
        error, pair_energy = pair_errors(site, config, site_stats) or (None, None)
        candidates = [config.rope_freqs] if config.rope_freqs is not None else rope_candidates(site.rope.n_pairs)
    rope_cost = 2 if mixed else 2 * n_kv
    if config.max_rope_width is not None:
        capped = [r for r in candidates if r * rope_cost <= config.max_rope_width]
        if not capped:
            raise ValueError(f"{site.layer}: max_rope_width={config.max_rope_width} is below this site's smallest rope "
                             f"part ({min(candidates) * rope_cost} values); raise it or fix rope_freqs lower")
        candidates = capped
    losses = {}
    for r in candidates:
        if mixed:
            slots = ranked[:r]
            rope_loss = float((errors.sum() - sum(errors[k * n_kv + j] for k, j in slots)) / energy.clamp(min=1e-30))
        else:
            chosen = kept_pairs(site, config, stats, r)
            slots = [(k, j) for j, kept in enumerate(chosen) for k in kept]
            rope_loss = 0.0
            if error is not None and r < site.rope.n_pairs:
                dropped = torch.ones_like(error, dtype=torch.bool)
                for j, kept in enumerate(chosen):
                    dropped[j, kept] = False
                rope_loss = float(error[dropped].sum() / pair_energy.sum().clamp(min=1e-30))
        w_nope = split_key_weights(w_key, None, pairs, mix, slots)[0].reshape(n_kv * hd, hidden)
        rows = torch.cat([w_nope, w_value])
        key_rows, value_rows = list(range(n_kv * hd)), list(range(n_kv * hd, n_kv * (hd + vd)))
        key_rank = n_kv * hd - 2 * len(slots)
        losses[r] = rope_loss + _latent_loss(rows @ g @ rows.T, key_rows, value_rows, hidden, config.svd,
                                             key_rank) / total
    return SiteChoices(losses=losses, rope_cost=rope_cost, fixed_cost=_key_scale_values(site),
                       min_latent=n_kv)


def units_per_slot(choices: SiteChoices) -> int:
    """Rope slots per rope unit of ``site_choices``: 1 for mixed slots, Hkv for a pair per kv head."""
    return choices.rope_cost // 2


def _latent_loss(gram_rows, key_rows, value_rows, hidden: int, mode: str, key_rank: int) -> torch.Tensor:
    """Energy lost at each latent width c = 0 .. full (joint: one spectrum; split: K and V halves);
    ``key_rank`` bounds the key rows' rank (kept slots are projected out of them)."""
    def tail(rows, rank):
        if not rows:
            return torch.zeros(1, dtype=torch.float64)
        idx = torch.tensor(rows)
        ev = torch.linalg.eigvalsh(gram_rows[idx][:, idx]).flip(0).clamp(min=0)[:min(hidden, rank)]
        return torch.cat([ev.sum()[None], ev.sum() - ev.cumsum(0)])            # [rank + 1]
    if mode == "joint":
        return tail(key_rows + value_rows, key_rank + len(value_rows))
    t_k, t_v = tail(key_rows, key_rank), tail(value_rows, len(value_rows))
    full = (t_k.shape[0] - 1) + (t_v.shape[0] - 1)
    out = torch.empty(full + 1, dtype=torch.float64)
    for c in range(full + 1):
        c_k = split_key_width(key_rank, hidden, c)
        out[c] = t_k[c_k] + t_v[min(c - c_k, t_v.shape[0] - 1)]
    return out


def _key_scale_values(site: AttentionSite) -> int:
    return {None: 0, "head": site.n_kv_heads, "all": 1}[site.key_norm.group if site.key_norm else None]


def original_values(site: AttentionSite) -> int:
    return site.n_kv_heads * (site.head_dim + site.value_dim)


def allocate_budget(sites: list[AttentionSite], config: MLAConfig, stats) -> dict[int, tuple[int, int]]:
    """Site index → (rope slots kept, latent width), within ``config.kv_budget`` of the original
    cache values per token of these sites."""
    original = sum(original_values(s) for s in sites)
    budget = math.floor(config.kv_budget * original + 1e-9)
    choices = [site_choices(s, config, stats) for s in sites]
    try:
        picked = allocate(choices, budget)
    except BudgetError:
        minimum = sum(c.cheapest() for c in choices)
        fraction = math.ceil(minimum / original * 1e4) / 1e4
        rope = (f"rope_freqs={config.rope_freqs} rotary pairs" if config.rope_freqs is not None
                else "one rope slot")
        raise ValueError(f"kv_budget={config.kv_budget} keeps {budget:,} of {original:,} cached values per token, "
                         f"below the minimum of {minimum:,} ({rope} and one latent value per kv head at every "
                         f"site); use kv_budget >= {fraction}") from None
    return {s.index: (r * units_per_slot(c), latent) for s, c, (r, latent) in zip(sites, choices, picked)}
