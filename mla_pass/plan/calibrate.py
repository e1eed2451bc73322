"""Run the captured program on calibration tokens and collect per-site statistics.

Observers are spliced into a copy of the graph after the nodes of interest (no model hooks),
reduce each batch to running sums, and keep nothing else, so memory stays bounded:
- rotary pair norms of the raw (pre-RoPE) q and k, for ``rope_strategy="2-norm"``;
- per query head, rotary pair and pair of kv heads, the moments that give the attention-score
  error of dropping any mixed rope slot's rotation (and the score energy it carries), plus the
  keys' second moment across kv heads per pair (the mixing), for ``rope_strategy="score-error"``,
  ``rope_mix`` and ``kv_budget``;
- per query head and rotary pair, the moments that fit the map replacing a dropped pair's
  rotation (``math.nope_fit``), uniform or attention-weighted, for ``nope_fit``;
- the Gram matrix Σ x xᵀ of the K/V projections' input, for activation-aware SVD.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..frontend.match import AttentionSite
from ..graph import clone_graph_module, insert_observer, run_on_tokens
from ..math.nope_fit import WEIGHTINGS, pair_fit_moments
from ..math.rope import causal_pairs, key_mix_moments, pair_norms, slot_errors, slot_score_moments

logger = logging.getLogger(__name__)


@dataclass
class SiteStats:
    query_pair_norms: torch.Tensor | None = None     # [H, P], mean over tokens
    key_pair_norms: torch.Tensor | None = None       # [Hkv, P]
    gram: torch.Tensor | None = None                 # [D, D] float64, mean of x xᵀ
    tokens: int = 0
    pair_score_error: torch.Tensor | None = None     # [Hkv, P], mean over causal token pairs, Σ over the group
    pair_score_energy: torch.Tensor | None = None    # [Hkv, P], mean (q_rot·k_rot)² of each pair, same averaging
    slot_score_error: torch.Tensor | None = None     # [H, P, Hkv, Hkv], ``math.rope.slot_score_moments``, same averaging
    slot_score_energy: torch.Tensor | None = None    # [H, P, Hkv, Hkv]
    key_mix_moments: torch.Tensor | None = None      # [P, Hkv, Hkv], mean over tokens of k_g^(k)·k_g'^(k)
    nope_moments: dict[str, torch.Tensor] = field(default_factory=dict)   # weighting → [H, P, 3, 3], weighted mean


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


class _ScoreErrorCollector:
    """Receives a site's raw and rotated q and k of one batch (in whatever order the program
    produces them) and, once it has all four, adds their pair score errors (and the moments of the
    ``weightings`` asked for) to running sums."""

    NAMES = ("query_raw", "query", "key_raw", "key")

    def __init__(self, site: AttentionSite, score_error: bool = True, weightings: tuple[str, ...] = ()):
        self.pairs, self.kv_map = site.rope.pairs, site.kv_head_of_query
        self.score_error, self.weightings = score_error, weightings
        self.scale, self.softcap = float(site.scale), site.core.softcap
        self.moments: dict[str, torch.Tensor] = {}
        self.weight_totals: dict[str, float] = {w: 0.0 for w in weightings}
        self.layouts = {"query_raw": site.raw_layouts["query"], "key_raw": site.raw_layouts["key"],
                        "query": "BHSD", "key": "BHSD"}
        self.pending: dict[str, torch.Tensor] = {}
        self.error = self.energy = self.key_moments = None
        self.count = self.tokens = 0

    def put(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t if self.layouts[name] == "BHSD" else t.transpose(1, 2)
        if len(self.pending) < len(self.NAMES):
            return
        p = self.pending
        if self.score_error:
            err, energy = slot_score_moments(p["query_raw"], p["query"], p["key_raw"], p["key"], self.pairs)
            moments = key_mix_moments(p["key"], self.pairs)       # rotation keeps the cross-head products
            self.error = err if self.error is None else self.error + err
            self.energy = energy if self.energy is None else self.energy + energy
            self.key_moments = moments if self.key_moments is None else self.key_moments + moments
            self.count += causal_pairs(p["key"].shape[0], p["key"].shape[2])
            self.tokens += p["key"].shape[0] * p["key"].shape[2]
        for w in self.weightings:
            m, total = pair_fit_moments(p["query_raw"], p["query"], p["key_raw"], p["key"], self.pairs, self.kv_map,
                                        w, self.scale, self.softcap)
            self.moments[w] = m if w not in self.moments else self.moments[w] + m
            self.weight_totals[w] += total
        self.pending = {}

    def fill(self, s: SiteStats) -> None:
        """The means of the slot moments into ``s``, and their unmixed (per kv head) totals."""
        s.slot_score_error, s.slot_score_energy = self.error / max(self.count, 1), self.energy / max(self.count, 1)
        s.key_mix_moments = self.key_moments / max(self.tokens, 1)
        eye = torch.eye(s.key_mix_moments.shape[-1], dtype=torch.float64).expand_as(s.key_mix_moments)
        s.pair_score_error = slot_errors(s.slot_score_error, eye, self.kv_map).T.contiguous()
        s.pair_score_energy = slot_errors(s.slot_score_energy, eye, self.kv_map).T.contiguous()


class _SlotObserver(torch.nn.Module):
    """Hands its input to a collector under a name, passes it through."""

    def __init__(self, collector: _ScoreErrorCollector, name: str):
        super().__init__()
        self.collector, self.name = collector, name

    def forward(self, t):
        self.collector.put(self.name, t.detach())
        return t


def collect(gm: fx.GraphModule, sites: list[AttentionSite], tokens, takes_positions: bool, *,
            rope_norms: bool, gram: bool, score_error: bool = False, nope_moments: tuple[str, ...] = (),
            batch_size: int = 4, progress: bool = True) -> CalibrationStats:
    """Per-site statistics of ``tokens`` [N, L]; ``nope_moments`` lists the weightings
    (``math.nope_fit.WEIGHTINGS``) whose fit moments to collect."""
    bad = [w for w in nope_moments if w not in WEIGHTINGS]
    if bad:
        raise ValueError(f"nope_moments weightings must be among {WEIGHTINGS}, got {bad}")
    tokens = as_token_batches(tokens)
    probe, mapping = clone_graph_module(gm)
    observers: dict[tuple[int, str], torch.nn.Module] = {}
    collectors: dict[int, _ScoreErrorCollector] = {}

    def observe(site, kind, node, obs):
        insert_observer(probe, mapping[node], f"_mla_observer_{site.index}_{kind}", obs)
        observers[(site.index, kind)] = obs

    for site in sites:
        if rope_norms and site.rope.pairs:
            observe(site, "query", site.query_raw, _PairNormObserver(site.rope.pairs, site.raw_layouts["query"]))
            observe(site, "key", site.key_raw, _PairNormObserver(site.rope.pairs, site.raw_layouts["key"]))
        if gram:
            observe(site, "gram", site.hidden, _GramObserver())
        if (score_error or nope_moments) and site.rope.pairs:
            collector = _ScoreErrorCollector(site, score_error, tuple(nope_moments))
            collectors[site.index] = collector
            for name, node in zip(collector.NAMES, (site.query_raw, site.core.query, site.key_raw, site.key_head)):
                insert_observer(probe, mapping[node], f"_mla_observer_{site.index}_score_{name}",
                                _SlotObserver(collector, name))
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
        if site.index in collectors:
            c = collectors[site.index]
            if score_error:
                c.fill(s)
            s.nope_moments = {w: m / max(c.weight_totals[w], 1.0) for w, m in c.moments.items()}
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
    if int(t.min()) < 0:
        raise ValueError(f"calibration token ids must be >= 0, got {int(t.min())}")
    return t.long()
