"""Run the captured program on calibration tokens and collect per-site statistics.

Observers are spliced into a copy of the graph after the nodes of interest (no model hooks),
reduce each batch to running sums, and keep nothing else, so memory stays bounded:
- rotary pair norms of the raw (pre-RoPE) q and k, for ``rope_strategy="2-norm"``;
- the Gram matrix Σ x xᵀ of the K/V projections' input, for activation-aware SVD.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph import clone_graph_module, insert_observer, run_on_tokens
from .math.rope import pair_norms
from .match import AttentionSite

logger = logging.getLogger(__name__)


@dataclass
class SiteStats:
    query_pair_norms: torch.Tensor | None = None     # [H, P], mean over tokens
    key_pair_norms: torch.Tensor | None = None       # [Hkv, P]
    gram: torch.Tensor | None = None                 # [D, D] float64, mean of x xᵀ
    tokens: int = 0


@dataclass
class CalibrationStats:
    sites: dict[int, SiteStats] = field(default_factory=dict)


class _PairNormObserver(torch.nn.Module):
    """Accumulates Σ_tokens ‖t^(k)‖ per head and pair, passes its input through."""

    def __init__(self, pairs, layout: str):
        super().__init__()
        self.pairs, self.layout = pairs, layout
        self.total, self.tokens = None, 0

    def forward(self, t):
        heads = t if self.layout == "BHSD" else t.transpose(1, 2)
        s = pair_norms(heads.detach(), self.pairs)
        self.total = s if self.total is None else self.total + s
        self.tokens += heads.shape[0] * heads.shape[2]
        return t

    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)


class _GramObserver(torch.nn.Module):
    """Accumulates Σ x xᵀ (float64) of a [B, S, D] input, passes it through."""

    def __init__(self):
        super().__init__()
        self.total, self.tokens = None, 0

    def forward(self, x):
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        g = flat.T @ flat
        self.total = g if self.total is None else self.total + g
        self.tokens += flat.shape[0]
        return x


def collect(gm: fx.GraphModule, sites: list[AttentionSite], tokens, takes_positions: bool, *,
            rope_norms: bool, gram: bool, batch_size: int = 4, progress: bool = True) -> CalibrationStats:
    tokens = as_token_batches(tokens)
    probe, mapping = clone_graph_module(gm)
    observers: dict[tuple[int, str], torch.nn.Module] = {}

    def observe(site, kind, node, obs):
        insert_observer(probe, mapping[node], f"_mla_observer_{site.index}_{kind}", obs)
        observers[(site.index, kind)] = obs

    for site in sites:
        if rope_norms and site.rope.pairs:
            observe(site, "query", site.query_raw, _PairNormObserver(site.rope.pairs, site.raw_layouts["query"]))
            observe(site, "key", site.key_raw, _PairNormObserver(site.rope.pairs, site.raw_layouts["key"]))
        if gram:
            observe(site, "gram", site.hidden, _GramObserver())
    probe.recompile()
    run_on_tokens(probe, tokens, takes_positions, batch_size=batch_size, desc="calibrating", progress=progress)
    stats = CalibrationStats()
    for site in sites:
        s = SiteStats()
        if (site.index, "query") in observers:
            s.query_pair_norms = observers[(site.index, "query")].mean()
            s.key_pair_norms = observers[(site.index, "key")].mean()
        if (site.index, "gram") in observers:
            obs = observers[(site.index, "gram")]
            s.gram, s.tokens = obs.total / max(obs.tokens, 1), obs.tokens
        stats.sites[site.index] = s
    return stats


def as_token_batches(tokens) -> torch.Tensor:
    t = torch.as_tensor(tokens)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32) or t.numel() == 0:
        raise ValueError(f"calibration must be non-empty token ids shaped [N, L] or [L], got "
                         f"{tuple(t.shape)} {t.dtype}")
    if t.shape[1] < 2:
        raise ValueError("calibration sequences need at least 2 tokens")
    return t.long()
