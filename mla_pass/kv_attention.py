"""The unconverted baseline: a site's attention with the usual key/value cache.

Every comparison (speed, bytes, the exported baseline) runs the original model through the same
capture → match → rewrite path as the converted one, with this module in place of
``LatentAttention``: it reads the site's own rotated key and value heads and caches them, so the
two programs differ only in the attention block. At every step it computes exactly what the
original model computes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .latent_attention import split_cache_args, update_cache
from .math.attention import attention_probs_apply, expand_kv


@dataclass
class KVPlan:
    """Shapes of one site's key/value cache (mirrors ``SitePlan``'s cache interface)."""
    index: int
    layer: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    value_dim: int
    kv_head_of_query: list[int]
    scale: float
    softcap: float | None

    cache_kinds = ["key", "value"]

    def cache_shape(self, kind: str, batch: int, length: int) -> tuple[int, ...]:
        width = self.head_dim if kind == "key" else self.value_dim
        return (batch, self.n_kv_heads, length, width)

    @property
    def cached_values_per_token(self) -> int:
        return self.n_kv_heads * (self.head_dim + self.value_dim)

    def to_dict(self) -> dict:
        return asdict(self)


class KVCacheAttention(nn.Module):
    """``forward(query [B,H,S,D], key [B,Hkv,S,D], value [B,Hkv,S,Dv], mask, past_key, past_value)``
    → ``(out [B,H,S,Dv], present_key, present_value)``, the cache growing along axis 2."""

    def __init__(self, plan: KVPlan):
        super().__init__()
        self.plan = plan
        self.register_buffer("kv_head_of_query", torch.tensor(plan.kv_head_of_query, dtype=torch.long),
                             persistent=False)
        self.cache_update = "concat"   # or "in_place" (rewrite.to_in_place)

    def forward(self, query, key, value, mask, *past):
        (past_key, past_value), write_index = split_cache_args(past, self.cache_update)
        key = update_cache(past_key, key, 2, write_index)
        value = update_cache(past_value, value, 2, write_index)
        p = self.plan
        if p.softcap is None:
            g = p.n_heads // p.n_kv_heads
            uniform = p.kv_head_of_query == [h // g for h in range(p.n_heads)]
            k = key if uniform else expand_kv(key, self.kv_head_of_query)
            v = value if uniform else expand_kv(value, self.kv_head_of_query)
            out = nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=p.scale,
                                                             enable_gqa=uniform and g > 1)
        else:
            k, v = expand_kv(key, self.kv_head_of_query), expand_kv(value, self.kv_head_of_query)
            probs = attention_probs_apply(query @ k.transpose(-1, -2) * p.scale, mask, False, p.softcap)
            out = probs.to(v.dtype) @ v
        return out, key, value
