"""The unconverted baseline: a site's attention with the usual key/value cache.

Every comparison (speed, bytes, the exported baseline) runs the original model through the same
capture → match → rewrite path as the converted one, with this module in place of
``LatentAttention``: it reads the site's own rotated key and value heads and caches them, so the
two programs differ only in the attention block. At every step it computes exactly what the
original model computes.

In the in-place program (``lowering.in_place.to_in_place``) a site whose attention onnxruntime's
``GroupQueryAttention`` can express runs as that one op (``ops.group_query_attention``, set
up by ``lowering.group_query.use_group_query_attention``): it writes the new tokens into the preallocated
buffers and reads only the first T+S of them, as onnxruntime-genai's own export does. Sites it
cannot express keep the masked SDPA over the whole buffer (``KVPlan.group_query_attention_refusal``
says why): values of another head size than keys (GroupQueryAttention has one head size), or query
heads that do not read their kv heads in ``repeat_kv`` order (h → h // (H / Hkv)).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..math.attention import attention_probs_apply, expand_kv, in_repeat_kv_order
from ..ops.group_query_attention import group_query_attention
from .cache import split_cache_args, update_cache
from .modes import MODULE_CACHE_UPDATES, Mode


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

    def group_query_attention_refusal(self) -> str | None:
        """Why ``GroupQueryAttention`` cannot express this site, or None when it can."""
        if self.value_dim != self.head_dim:
            return f"values have head size {self.value_dim} and keys {self.head_dim} (GroupQueryAttention has one)"
        if not in_repeat_kv_order(self.kv_head_of_query, self.n_kv_heads):
            return "query heads do not read their kv heads in repeat_kv order (h -> h // (H / Hkv))"
        return None


class KVCacheAttention(nn.Module):
    """``forward(query [B,H,S,D], key [B,Hkv,S,D], value [B,Hkv,S,Dv], mask, past_key, past_value)``
    → ``(out [B,H,S,Dv], present_key, present_value)``, the cache growing along axis 2.

    With ``op = "group_query_attention"`` (in-place programs only) ``mask`` is instead the tuple
    ``(attention_bias, seqlens_k, total_sequence_length, query_seqlens)`` of
    ``lowering.group_query.GroupQueryCacheInputs`` and no write index follows the buffers."""
    cache_update = Mode(MODULE_CACHE_UPDATES, "concat", "in_place: past are preallocated buffers (lowering.in_place); "
                        "static: buffers written in place (lowering.static_cache)")
    op = Mode(("sdpa", "group_query_attention"), "sdpa", "group_query_attention: one op per site "
              "(lowering.group_query)")

    def __init__(self, plan: KVPlan):
        super().__init__()
        self.plan = plan
        self.register_buffer("kv_head_of_query", torch.tensor(plan.kv_head_of_query, dtype=torch.long),
                             persistent=False)

    def forward(self, query, key, value, mask, *past):
        if self.op == "group_query_attention":
            return self._group_query_attention(query, key, value, mask, *past)
        (past_key, past_value), write_index = split_cache_args(past, self.cache_update)
        static = self.cache_update == "static"
        key = update_cache(past_key, key, 2, write_index, static)
        value = update_cache(past_value, value, 2, write_index, static)
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

    def _group_query_attention(self, query, key, value, inputs, past_key, past_value):
        p = self.plan
        bias, seqlens_k, total, query_seqlens = inputs
        b, _, s, d = query.shape
        flat = lambda t, heads: t.transpose(1, 2).reshape(b, s, heads * d)  # noqa: E731  [B,S,heads·D]
        out, present_key, present_value = group_query_attention(
            flat(query, p.n_heads), flat(key, p.n_kv_heads), flat(value, p.n_kv_heads), past_key, past_value,
            seqlens_k, total, bias, query_seqlens, p.n_heads, p.n_kv_heads, p.scale, p.softcap or 0.0)
        return out.view(b, s, p.n_heads, d).transpose(1, 2), present_key, present_value
