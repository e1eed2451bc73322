"""The unconverted model as a decode-step program with the usual key/value cache.

``kv_step_program(model)`` captures and matches the model exactly as ``convert`` does, then
rewrites each site with ``KVCacheAttention``: the result has the same interface as
``MLAModel.step`` (``input_ids, position_ids, attention_mask, *past → logits, *present``) with
``past_key_values.{i}.key|value [B, Hkv, T, D]``. Exporters and benchmarks use it as the
baseline, so original and converted go through one code path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .frontend.capture import capture
from .frontend.sites import (
    NoAttentionError,
    SiteReport,
    UnsupportedAttentionError,
    find_sites,
    kv_bytes_per_token,
    report_row,
)
from .modules.kv_attention import KVCacheAttention, KVPlan
from .rewrite import MODULES, CacheMask, CacheTensor, rewrite


@dataclass
class KVStepProgram:
    step: fx.GraphModule
    cache_spec: list[CacheTensor]
    plans: dict[int, KVPlan]
    vocab_size: int
    source: dict
    generation: dict
    report: list[SiteReport]           # one row per site (shapes, cache values per token)

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        p = next(self.step.parameters())
        return [torch.zeros(self.plans[t.site].cache_shape(t.kind, batch, 0), dtype=p.dtype, device=p.device)
                for t in self.cache_spec]

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.float16) -> int:
        return kv_bytes_per_token(self.report, dtype, original=True)


def kv_step_program(model: nn.Module) -> KVStepProgram:
    """The original model's decode step with a key/value cache (every site must match)."""
    captured = capture(model)
    if not captured.takes_positions:
        raise ValueError(f"{type(model).__name__}.forward takes no position_ids, so it cannot decode from a cache")
    sites, errors = find_sites(captured)
    if errors:
        raise UnsupportedAttentionError(errors)
    if not sites:
        raise NoAttentionError("no attention found in the captured graph: nothing to cache")
    plans = {s.index: KVPlan(index=s.index, layer=s.layer, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads,
                             head_dim=s.head_dim, value_dim=s.value_dim,
                             kv_head_of_query=list(s.kv_head_of_query), scale=s.scale, softcap=s.core.softcap)
             for s in sites}
    modules = nn.ModuleDict({str(i): KVCacheAttention(p) for i, p in plans.items()})
    root = captured.gm
    root.add_module(MODULES, modules)
    root.add_module("cache_mask", CacheMask())
    step, cache = rewrite(captured.gm, sites, {i: modules[str(i)] for i in plans}, root, with_cache=True)
    return KVStepProgram(step, cache, plans, captured.vocab_size, captured.source, captured.generation,
                         [report_row(s, None) for s in sites])
