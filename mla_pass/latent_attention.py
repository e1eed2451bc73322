"""The module that replaces one attention core: latent K/V with partial RoPE.

The rewritten graph calls it as ``attn(x, query_raw, query, key_rope_full, mask[, past_latent,
past_rope_key])``: ``query`` is the model's own rotated query and ``query_raw`` the same before
RoPE, so partial RoPE on q is a per-dim select and any RoPE idiom works unchanged. The rope
keys come from ``rope_key`` (a projection onto the kept dims, zero elsewhere) passed through a
copy of the model's own RoPE region.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .math.attention import absorbed_attention, decompressed_attention

FORMS = ("auto", "absorbed", "decompressed")


@dataclass
class SitePlan:
    """Everything needed to build a site's module with the right shapes (saved with a model)."""
    index: int
    layer: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    value_dim: int
    hidden: int
    latent_dim: int
    rope_dims: list[list[int]]       # per kv head, the kept rotated dims (2r each)
    rotated_dims: list[int]          # dims the model rotates at all
    kv_head_of_query: list[int]
    scale: float
    softcap: float | None
    is_causal: bool
    query_raw_layout: str            # "BHSD" | "BSHD"
    key_raw_layout: str
    key_bias: bool
    value_bias: bool
    svd: str

    @property
    def rope_width(self) -> int:
        return len(self.rope_dims[0]) if self.rope_dims else 0

    @property
    def cached_values_per_token(self) -> int:
        return self.latent_dim + self.n_kv_heads * self.rope_width

    def to_dict(self) -> dict:
        return asdict(self)


class RopeKeyProjection(nn.Module):
    """x_BSD → k_rope_full in the model's pre-RoPE key layout, kept dims filled, others 0."""

    def __init__(self, plan: SitePlan):
        super().__init__()
        r2, n_kv = plan.rope_width, plan.n_kv_heads
        self.n_kv, self.head_dim, self.layout = n_kv, plan.head_dim, plan.key_raw_layout
        self.weight = nn.Parameter(torch.zeros(n_kv * r2, plan.hidden))
        self.bias = nn.Parameter(torch.zeros(n_kv * r2)) if plan.key_bias else None
        self.register_buffer("dims", torch.tensor(plan.rope_dims, dtype=torch.long).reshape(n_kv, r2), persistent=True)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s = x_BSD.shape[:2]
        kr_BSHkvR = nn.functional.linear(x_BSD, self.weight, self.bias).reshape(b, s, self.n_kv, -1)
        full = kr_BSHkvR.new_zeros(b, s, self.n_kv, self.head_dim)
        full = full.scatter(-1, self.dims.expand(b, s, -1, -1), kr_BSHkvR)
        return full if self.layout == "BSHD" else full.transpose(1, 2)


class LatentAttention(nn.Module):
    def __init__(self, plan: SitePlan):
        super().__init__()
        self.plan = plan
        p = plan
        n_nope = p.head_dim - p.rope_width
        self.down = nn.Parameter(torch.zeros(p.latent_dim, p.hidden))
        self.up_key = nn.Parameter(torch.zeros(p.n_kv_heads, n_nope, p.latent_dim))
        self.up_value = nn.Parameter(torch.zeros(p.n_kv_heads, p.value_dim, p.latent_dim))
        self.key_bias = nn.Parameter(torch.zeros(p.n_kv_heads, n_nope)) if p.key_bias else None
        self.value_bias = nn.Parameter(torch.zeros(p.n_kv_heads, p.value_dim)) if p.value_bias else None
        self.rope_key = RopeKeyProjection(p) if p.rope_width else None
        rope = torch.tensor(p.rope_dims, dtype=torch.long).reshape(p.n_kv_heads, p.rope_width)
        nope = torch.tensor([[d for d in range(p.head_dim) if d not in set(dims)] for dims in
                             rope.tolist()], dtype=torch.long).reshape(p.n_kv_heads, n_nope)
        kv_map = torch.tensor(p.kv_head_of_query, dtype=torch.long)
        rotated_q = torch.zeros(p.n_heads, p.head_dim, dtype=torch.bool)
        for h, j in enumerate(p.kv_head_of_query):
            rotated_q[h, rope[j]] = True
        for name, t in (("rope_dims", rope), ("nope_dims", nope), ("kv_head_of_query", kv_map),
                        ("query_rope_dims", rope[kv_map]), ("query_nope_dims", nope[kv_map]),
                        ("query_rotated", rotated_q)):
            self.register_buffer(name, t, persistent=False)
        self.form = "auto"

    # -- pieces -------------------------------------------------------------------------------
    def split_query(self, query_raw, query):
        """Partial RoPE on q: kept pairs from the rotated query, the rest from the raw one."""
        q_raw = query_raw if self.plan.query_raw_layout == "BHSD" else query_raw.transpose(1, 2)
        q = torch.where(self.query_rotated[None, :, None, :], query, q_raw)
        b, h, s, _ = q.shape
        q_nope = q.gather(-1, self.query_nope_dims[None, :, None, :].expand(b, h, s, -1))
        q_rope = q.gather(-1, self.query_rope_dims[None, :, None, :].expand(b, h, s, -1))
        return q_nope, q_rope

    def rope_keys(self, key_rope_full_BHkvSD, like_BSD):
        if key_rope_full_BHkvSD is None:
            b, s = like_BSD.shape[:2]
            return like_BSD.new_zeros(b, self.plan.n_kv_heads, s, 0)
        b, j, s, _ = key_rope_full_BHkvSD.shape
        return key_rope_full_BHkvSD.gather(-1, self.rope_dims[None, :, None, :].expand(b, j, s, -1))

    def decompress(self, latent_BTC):
        k_nope = torch.einsum("btc,jnc->bjtn", latent_BTC, self.up_key)
        v = torch.einsum("btc,jvc->bjtv", latent_BTC, self.up_value)
        if self.key_bias is not None:
            k_nope = k_nope + self.key_bias[None, :, None, :]
        if self.value_bias is not None:
            v = v + self.value_bias[None, :, None, :]
        return k_nope, v

    # -- the call the graph makes --------------------------------------------------------------
    def forward(self, x_BSD, query_raw, query, key_rope_full, mask, past_latent=None, past_rope_key=None):
        p = self.plan
        q_nope, q_rope = self.split_query(query_raw, query)
        latent = nn.functional.linear(x_BSD, self.down)                      # [B, S, C]
        k_rope = self.rope_keys(key_rope_full, x_BSD)                        # [B, Hkv, S, R]
        cached = past_latent is not None
        if cached:
            latent = torch.cat([past_latent, latent], dim=1)
            if past_rope_key is not None:
                k_rope = torch.cat([past_rope_key, k_rope], dim=2)
            else:                                  # no rope keys cached: zero-width over all keys
                k_rope = latent.new_zeros(latent.shape[0], p.n_kv_heads, latent.shape[1], 0)
        is_causal = p.is_causal and not cached
        form = self.form if self.form != "auto" else ("absorbed" if q_nope.shape[2] == 1 else "decompressed")
        if form == "absorbed":
            out = absorbed_attention(q_nope, q_rope, latent, k_rope, self.up_key, self.up_value, self.value_bias,
                                     self.kv_head_of_query, p.scale, mask, is_causal, p.softcap, self.key_bias)
        else:
            k_nope, v = self.decompress(latent)
            out = decompressed_attention(q_nope, q_rope, k_nope, k_rope, v, self.kv_head_of_query, p.scale,
                                         mask, is_causal, p.softcap)
        if cached:
            return out, latent, (k_rope if past_rope_key is not None else None)
        return out
