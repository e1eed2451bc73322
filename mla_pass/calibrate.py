"""Run the captured program on calibration tokens and collect per-site statistics.

Observers are spliced into a copy of the graph after the nodes of interest (no model hooks),
reduce each batch to running sums, and keep nothing else, so memory stays bounded.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from .graph import clone_graph_module
from .math.rope import pair_norms
from .match import AttentionSite

logger = logging.getLogger(__name__)


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


def rope_pair_norms(gm: fx.GraphModule, sites: list[AttentionSite], layouts: dict, tokens: torch.Tensor,
                    takes_positions: bool, batch_size: int = 4, progress: bool = True) -> dict:
    """{site index: (mean ‖q^(k)‖ [H, P], mean ‖k^(k)‖ [Hkv, P])} on raw (pre-RoPE) projections."""
    tokens = _as_batches(tokens)
    probe, mapping = clone_graph_module(gm)
    observers = {}
    for site in sites:
        if not site.rope.pairs:
            continue
        for kind, node in (("query", site.query_raw), ("key", site.key_raw)):
            target = mapping[node]
            obs = _PairNormObserver(site.rope.pairs, layouts[site.index][kind])
            name = f"_mla_observer_{site.index}_{kind}"
            probe.add_submodule(name, obs)
            with probe.graph.inserting_after(target):
                new = probe.graph.call_module(name, (target,))
            target.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
            observers[(site.index, kind)] = obs
    probe.recompile()
    from tqdm.auto import tqdm
    batches = list(torch.split(tokens, batch_size))
    device = next(gm.parameters()).device
    with torch.no_grad():
        for batch in tqdm(batches, desc="calibrating", disable=not progress, leave=False):
            batch = batch.to(device)
            args = (batch,)
            if takes_positions:
                args += (torch.arange(batch.shape[1], device=device).expand_as(batch).contiguous(),)
            probe(*args)
    return {s.index: (observers[(s.index, "query")].mean(), observers[(s.index, "key")].mean())
            for s in sites if (s.index, "query") in observers}


def _as_batches(tokens) -> torch.Tensor:
    t = torch.as_tensor(tokens)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32) or t.numel() == 0:
        raise ValueError(f"calibration must be non-empty token ids shaped [N, L] or [L], got "
                         f"{tuple(t.shape)} {t.dtype}")
    if t.shape[1] < 2:
        raise ValueError("calibration sequences need at least 2 tokens")
    return t.long()
