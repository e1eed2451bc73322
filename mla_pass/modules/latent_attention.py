"""The module that replaces one attention core: latent K/V with partial RoPE.

The rewritten graph calls it as ``attn(x, query_raw, query, key_rope_full, mask[, past_latent,
past_rope_key])``: ``query`` is the model's own rotated query and ``query_raw`` the same before
RoPE, so partial RoPE on q is a per-dim select and any RoPE idiom works unchanged. The rope
keys come from ``rope_key`` (a projection onto the kept dims, zero elsewhere) passed through a
copy of the model's own RoPE region. Where the plan fits the dropped pairs (``nope_pairs``), the
nope query goes through a per-head 2×2 map on each dropped pair (``query_nope_mix``: q' = Mᵀq,
see ``math.nope_fit``), so the cache and the key side are unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.dispatch import absorbed_decode
from ..math.absorbed_mqa import latent_mqa
from ..math.attention import decompressed_attention
from ..math.int8_cache import dequantize_per_token, quantize_per_token
from .cache import cache_time_axis, split_cache_args, update_cache
from .modes import CACHE_UPDATES, FORMS, LATENT_CACHES, Mode
from .site_plan import SitePlan


class RopeProjection(nn.Module):
    """x_BSD → the rotated dims of every head in the model's pre-RoPE layout, others 0: what the
    model's own RoPE is then applied to (so no rotation formula is assumed)."""

    def __init__(self, n_heads: int, head_dim: int, hidden: int, dims, layout: str, bias: bool):
        """``dims``: per head, the rotated dims it keeps (2r each)."""
        super().__init__()
        self.n_heads, self.head_dim, self.layout = n_heads, head_dim, layout
        dims = torch.as_tensor(dims, dtype=torch.long).reshape(n_heads, -1)
        self.weight = nn.Parameter(torch.zeros(dims.numel(), hidden))
        self.bias = nn.Parameter(torch.zeros(dims.numel())) if bias else None
        self.register_buffer("dims", dims, persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s = x_BSD.shape[:2]
        r_BSHR = nn.functional.linear(x_BSD, self.weight, self.bias).reshape(b, s, self.n_heads, -1)
        full = r_BSHR.new_zeros(b, s, self.n_heads, self.head_dim)
        full = full.scatter(-1, self.dims.expand(b, s, -1, -1), r_BSHR)
        return full if self.layout == "BSHD" else full.transpose(1, 2)


class RopeKeyProjection(RopeProjection):
    """x_BSD → k_rope_full in the model's pre-RoPE key layout, kept dims filled, others 0."""

    def __init__(self, plan: SitePlan):
        super().__init__(plan.n_kv_heads, plan.head_dim, plan.hidden, plan.rope_dims, plan.key_raw_layout,
                         bool(plan.key_bias))


class LatentAttention(nn.Module):
    form = Mode(FORMS, "auto", "auto: decompressed for prompts, absorbed for one-token steps")
    cache_update = Mode(CACHE_UPDATES, "concat", "in_place: past are preallocated buffers (lowering.in_place)")
    latent_cache = Mode(LATENT_CACHES, "float", "int8: 8-bit codes (uint8 + 128) + a per-token scale "
                        "(lowering.int8_latent)")

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
        if p.key_norm:   # the unweighted k projection, to compute each token's RMS scale
            self.key_norm_weight = nn.Parameter(torch.zeros(p.n_kv_heads * p.head_dim, p.hidden))
            self.key_norm_bias = nn.Parameter(torch.zeros(p.n_kv_heads * p.head_dim)) if p.key_norm_bias else None
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
        if p.nope_pairs:     # per query head and nope dim: (self, partner) coefficients; identity = (1, 0)
            partner = torch.arange(n_nope).repeat(p.n_heads, 1)
            for h, _, i0, i1 in self.dropped_pair_positions():
                partner[h, i0], partner[h, i1] = i1, i0
            self.register_buffer("query_nope_partner", partner, persistent=False)
            self.query_nope_mix = nn.Parameter(torch.stack([torch.ones(p.n_heads, n_nope),
                                                            torch.zeros(p.n_heads, n_nope)], dim=-1))
        else:
            self.register_parameter("query_nope_mix", None)
        self.decode_kernel = True    # the fused Triton decode on CUDA where it applies (kernels/dispatch.py)
        # the up-projections absorbed into the query and output projections (lowering/absorb.py, for export):
        # then the call's query_raw is unused, query is the model's RoPE of ``rope_query(x)`` and the
        # result is the output projection's [B, S, D] instead of [B, H, S, Dv]
        self.query_latent: nn.Linear | None = None
        self.rope_query: RopeProjection | None = None
        self.output_projection: nn.Linear | None = None

    @property
    def cache_kinds(self) -> list[str]:
        """This module's cache tensors in call order: the plan's, then the int8 latent's scales."""
        return self.plan.cache_kinds + (["latent_scale"] if self.latent_cache == "int8" else [])

    # -- pieces -------------------------------------------------------------------------------
    def split_query(self, query_raw, query):
        """Partial RoPE on q: kept pairs from the rotated query, the rest from the raw one."""
        q_raw = query_raw if self.plan.query_raw_layout == "BHSD" else query_raw.transpose(1, 2)
        q = torch.where(self.query_rotated[None, :, None, :], query, q_raw)
        b, h, s, _ = q.shape
        q_nope = q.gather(-1, self.query_nope_dims[None, :, None, :].expand(b, h, s, -1))
        q_rope = q.gather(-1, self.query_rope_dims[None, :, None, :].expand(b, h, s, -1))
        if self.query_nope_mix is not None:        # the fitted map standing in for dropped rotations
            partner = q_nope.gather(-1, self.query_nope_partner[None, :, None, :].expand(b, h, s, -1))
            q_nope = q_nope * self.query_nope_mix[:, None, :, 0] + partner * self.query_nope_mix[:, None, :, 1]
        return q_nope, q_rope

    def dropped_pair_positions(self) -> list[tuple[int, int, int, int]]:
        """(query head, index into ``plan.nope_pairs``, position of its two dims among the head's
        nope dims) for every rotary pair that head's kv head no longer rotates."""
        out = []
        for h, dims in enumerate(self.query_nope_dims.tolist()):
            where = {d: i for i, d in enumerate(dims)}
            out += [(h, k, where[d0], where[d1]) for k, (d0, d1) in enumerate(self.plan.nope_pairs or [])
                    if d0 in where and d1 in where]
        return out

    def rope_keys(self, key_rope_full_BHkvSD, like_BSD):
        if key_rope_full_BHkvSD is None:
            b, s = like_BSD.shape[:2]
            return like_BSD.new_zeros(b, self.plan.n_kv_heads, s, 0)
        b, j, s, _ = key_rope_full_BHkvSD.shape
        return key_rope_full_BHkvSD.gather(-1, self.rope_dims[None, :, None, :].expand(b, j, s, -1))

    def key_scale(self, x_BSD):
        """rsqrt(mean(t²) + eps) of the pre-norm key, per token and group → [B, G, S] (float32 math)."""
        p = self.plan
        b, s_len = x_BSD.shape[:2]
        t = nn.functional.linear(x_BSD, self.key_norm_weight, self.key_norm_bias).float()
        t = t.reshape(b, s_len, p.n_kv_heads, p.head_dim) if p.key_norm == "head" else t.reshape(b, s_len, 1, -1)
        return torch.rsqrt(t.pow(2).mean(-1) + p.key_norm_eps).transpose(1, 2).to(x_BSD.dtype)

    def decompress(self, latent_BTC):
        k_nope = torch.einsum("btc,jnc->bjtn", latent_BTC, self.up_key)
        v = torch.einsum("btc,jvc->bjtv", latent_BTC, self.up_value)
        if self.key_bias is not None:
            k_nope = k_nope + self.key_bias[None, :, None, :]
        if self.value_bias is not None:
            v = v + self.value_bias[None, :, None, :]
        return k_nope, v

    def cache_update_of(self, x_BSD, key_rope_full, past) -> tuple[dict, bool]:
        """This call's cache tensors (``cache_kinds``): the new tokens' alone without ``past``,
        else the past with them written in (T+S tokens each)."""
        p = self.plan
        new = {"latent": nn.functional.linear(x_BSD, self.down),                      # [B, S, C]
               "rope_key": self.rope_keys(key_rope_full, x_BSD)}                      # [B, Hkv, S, R]
        if p.key_norm:
            new["key_scale"] = self.key_scale(x_BSD)                                  # [B, G, S]
            new["rope_key"] = new["rope_key"] * new["key_scale"].expand(-1, p.n_kv_heads, -1)[..., None]
        cached = len(past) > 0
        kinds = self.cache_kinds
        if cached:
            past, write_index = split_cache_args(past, self.cache_update)
            if len(past) != len(kinds):
                raise ValueError(f"{p.layer}: expected cache tensors {kinds}, got {len(past)}")
            if "latent_scale" in kinds:
                new["latent"], new["latent_scale"] = quantize_per_token(new["latent"])
            for kind, old in zip(kinds, past):
                new[kind] = update_cache(old, new[kind], cache_time_axis(kind), write_index)
        if "rope_key" not in p.cache_kinds:            # no rope keys: zero-width over all keys
            latent = new["latent"]
            new["rope_key"] = latent.new_zeros(latent.shape[0], p.n_kv_heads, latent.shape[1], 0)
        return new, cached

    def absorbed_projections(self, x_BSD, query_rope_full, new: dict, mask, cached: bool):
        """The absorbed form with the up-projections folded into the query and output
        projections (``math/absorption.py``) → the output projection's y [B, S, D]."""
        p = self.plan
        b, s = x_BSD.shape[:2]
        q_latent = self.query_latent(x_BSD).reshape(b, s, p.n_heads, -1).transpose(1, 2)        # [B,H,S,C], scaled
        if self.rope_query is not None:        # the model's RoPE of rope_query(x), heads first like its core's query
            q_rope = query_rope_full.gather(-1, self.query_rope_dims[None, :, None, :].expand(b, p.n_heads, s, -1))
        else:
            q_rope = q_latent.new_zeros(b, p.n_heads, s, 0)
        out_latent = latent_mqa(q_latent, q_rope, new["latent"], new["rope_key"], mask, p.is_causal and not cached,
                                new.get("latent_scale"))
        return self.output_projection(out_latent.transpose(1, 2).reshape(b, s, -1))

    # -- the call the graph makes --------------------------------------------------------------
    def forward(self, x_BSD, query_raw, query, key_rope_full, mask, *past):
        """Without ``past``: out [B,H,S,Dv]. With the cache tensors of ``plan.cache_kinds``
        (each holding T earlier tokens): (out, *present) with T+S tokens each."""
        p = self.plan
        new, cached = self.cache_update_of(x_BSD, key_rope_full, past)
        if self.query_latent is not None:
            out = self.absorbed_projections(x_BSD, query, new, mask, cached)
        else:
            out = self.attention(query_raw, query, new, mask, cached)
        if cached:
            return (out, *(new[kind] for kind in self.cache_kinds))
        return out

    def attention(self, query_raw, query, new: dict, mask, cached: bool):
        """The model's own query against the cache tensors ``new``, in ``form`` → out [B,H,S,Dv]."""
        p = self.plan
        q_nope, q_rope = self.split_query(query_raw, query)
        latent, latent_scale = new["latent"], new.get("latent_scale")
        key_scale = None
        if p.key_norm:
            key_scale = new["key_scale"].expand(-1, p.n_kv_heads, -1)                  # [B, Hkv, T]
        is_causal = p.is_causal and not cached
        form = self.form if self.form != "auto" else ("absorbed" if q_nope.shape[2] == 1 else "decompressed")
        if form == "absorbed":
            out = absorbed_decode(q_nope, q_rope, latent, new["rope_key"], self.up_key, self.up_value,
                                  self.value_bias, self.kv_head_of_query, p.scale, mask, is_causal, p.softcap,
                                  self.key_bias, key_scale, kv_heads=p.kv_head_of_query, use_kernel=self.decode_kernel,
                                  latent_scale_BT=latent_scale)
        else:
            if latent_scale is not None:
                latent = dequantize_per_token(latent, latent_scale)
            k_nope, v = self.decompress(latent)
            if key_scale is not None:
                k_nope = k_nope * key_scale[..., None]
            out = decompressed_attention(q_nope, q_rope, k_nope, new["rope_key"], v, self.kv_head_of_query, p.scale,
                                         mask, is_causal, p.softcap)
        return out
