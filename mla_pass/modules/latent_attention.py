"""The module that replaces one attention core: latent K/V with partial RoPE over shared rope slots.

The rewritten graph calls it as ``attn(x, query_raw, query, key_rope_full, mask[, past_latent,
past_rope_key])``: ``query`` is the model's own rotated query and ``query_raw`` the same before
RoPE, so any RoPE idiom works unchanged. The rope keys come from ``rope_key`` (a projection onto
the kept slots, each rotary pair k mixed across kv heads by U_k and slot (k, j) placed in kv head
j's pair-k dims, zero elsewhere) passed through a copy of the model's own RoPE region, and are
cached once for every query head ([B, 1, T, 2S], DeepSeek's k_pe). A query head's rope part is its
rotated pair k times U_k[g(h), j] on slot (k, j) (``rope_query_mix``); its nope part is the whole
unrotated query against keys from which the kept slots are projected out (``up_key`` over every
dim). Where the plan fits the dropped pairs (unmixed, ``nope_pairs``), the nope query goes through
a per-head 2×2 map on each dropped pair (``query_nope_mix``: q' = Mᵀq, see ``math.nope_fit``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.dispatch import absorbed_decode
from ..math.absorbed_mqa import latent_mqa, mask_bias
from ..math.attention import decompressed_attention, expand_kv, in_repeat_kv_order, per_query_head
from ..math.int8_cache import (ZERO_POINT, ZERO_POINT_4BIT, dequantize_per_token, quantize_per_token,
                               quantize_per_token_int4, unpack_int4)
from ..ops.choose_form import choose_form
from .cache import cache_time_axis, split_cache_args, update_cache
from .modes import FORMS, LATENT_CACHES, MODULE_CACHE_UPDATES, Mode
from .site_plan import SitePlan


class RopeProjection(nn.Module):
    """x_BSD → chosen dims of the heads in the model's pre-RoPE layout, others 0: what the model's
    own RoPE is then applied to (so no rotation formula is assumed)."""

    def __init__(self, n_heads: int, head_dim: int, hidden: int, positions, layout: str, bias: bool):
        """``positions``: the filled entries, as head · head_dim + dim (distinct)."""
        super().__init__()
        self.n_heads, self.head_dim, self.layout = n_heads, head_dim, layout
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        self.weight = nn.Parameter(torch.zeros(positions.numel(), hidden))
        self.bias = nn.Parameter(torch.zeros(positions.numel())) if bias else None
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s = x_BSD.shape[:2]
        r_BSR = nn.functional.linear(x_BSD, self.weight, self.bias)
        full = r_BSR.new_zeros(b, s, self.n_heads * self.head_dim)
        full = full.index_copy(-1, self.positions, r_BSR).reshape(b, s, self.n_heads, self.head_dim)
        return full if self.layout == "BSHD" else full.transpose(1, 2)


class RopeKeyProjection(RopeProjection):
    """x_BSD → the kept slots' (mixed) keys in the model's pre-RoPE key layout, others 0: slot
    (k, j) sits in kv head j's pair-k dims (RoPE turns that pair of every head alike)."""

    def __init__(self, plan: SitePlan):
        positions = [j * plan.head_dim + d for k, j in plan.rope_slots for d in plan.rope_pairs[k]]
        super().__init__(plan.n_kv_heads, plan.head_dim, plan.hidden, positions, plan.key_raw_layout,
                         bool(plan.key_bias))


class LatentAttention(nn.Module):
    form = Mode(FORMS, "auto", "auto: decompressed for prompts, absorbed for one-token steps")
    cache_update = Mode(MODULE_CACHE_UPDATES, "concat", "in_place: past are preallocated buffers (lowering.in_place); "
                        "static: buffers written in place (lowering.static_cache)")
    latent_cache = Mode(LATENT_CACHES, "float", "int8: 8-bit codes (uint8 + 128) + a per-token scale; int4: "
                        "4-bit codes packed two a byte + a per-token scale (lowering.int8_latent)")

    def __init__(self, plan: SitePlan):
        super().__init__()
        self.plan = plan
        p = plan
        n_nope = p.head_dim       # every dim scores unrotated too: the kept slots' share is projected out of it
        self.down = nn.Parameter(torch.zeros(p.latent_dim, p.hidden))
        self.up_key = nn.Parameter(torch.zeros(p.n_kv_heads, n_nope, p.latent_dim))
        self.up_value = nn.Parameter(torch.zeros(p.n_kv_heads, p.value_dim, p.latent_dim))
        self.key_bias = nn.Parameter(torch.zeros(p.n_kv_heads, n_nope)) if p.key_bias else None
        self.value_bias = nn.Parameter(torch.zeros(p.n_kv_heads, p.value_dim)) if p.value_bias else None
        self.rope_key = RopeKeyProjection(p) if p.rope_width else None
        if p.key_norm:   # the unweighted k projection, to compute each token's RMS scale
            self.key_norm_weight = nn.Parameter(torch.zeros(p.n_kv_heads * p.head_dim, p.hidden))
            self.key_norm_bias = nn.Parameter(torch.zeros(p.n_kv_heads * p.head_dim)) if p.key_norm_bias else None
        # U_k per rotary pair (columns: the mixed components), saved: recovery replays the original's keys through it
        self.register_buffer("rope_mix", torch.eye(p.n_kv_heads).repeat(len(p.rope_pairs), 1, 1))
        slot_dims = [d for k, _ in p.rope_slots for d in p.rope_pairs[k]]
        slot_heads = [j for _, j in p.rope_slots for _ in range(2)]
        # the query's rope part: slot (k, j) reads head h's rotated pair k times U_k[g(h), j] (trainable)
        self.rope_query_mix = nn.Parameter(torch.zeros(p.n_heads, p.rope_width)) if p.rope_width else None
        kv_map = torch.tensor(p.kv_head_of_query, dtype=torch.long)
        for name, t in (("rope_value_dims", torch.tensor(slot_dims, dtype=torch.long)),
                        ("rope_value_heads", torch.tensor(slot_heads, dtype=torch.long)),
                        ("rope_key_positions", torch.tensor([j * p.head_dim + d for d, j in zip(slot_dims, slot_heads)],
                                                            dtype=torch.long)),
                        ("kv_head_of_query", kv_map),
                        ("query_nope_dims", torch.arange(p.head_dim).repeat(p.n_heads, 1))):
            self.register_buffer(name, t, persistent=False)
        if p.nope_pairs:     # per query head and dim: (self, partner) coefficients; identity = (1, 0)
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
        # with form "auto" the decompressed form's projections, which prompts (S > 1) run: the scaled nope
        # query [H·Dh] and the output projection of [H·Dv] (value bias folded in); one-token steps share them
        # where folding W_uk / W_uv would read more weight bytes (then query_latent / output_projection stay None)
        self.query_nope_projection: nn.Linear | None = None
        self.value_output_projection: nn.Linear | None = None

    @property
    def latent_zero_point(self) -> int:
        """The zero point of the latent codes attention reads (8-bit: 128; unpacked 4-bit: 8)."""
        return ZERO_POINT_4BIT if self.latent_cache == "int4" else ZERO_POINT

    @property
    def cache_kinds(self) -> list[str]:
        """This module's cache tensors in call order: the plan's, then the int8 latent's scales."""
        return self.plan.cache_kinds + (["latent_scale"] if self.latent_cache != "float" else [])

    # -- pieces -------------------------------------------------------------------------------
    def split_query(self, query_raw, query):
        """Partial RoPE on q: every dim unrotated (the nope part), and the kept slots' rotated pairs
        weighted by the mixing (the rope part)."""
        q_nope = query_raw if self.plan.query_raw_layout == "BHSD" else query_raw.transpose(1, 2)
        if self.query_nope_mix is not None:        # the fitted map standing in for dropped rotations
            b, h, s, _ = q_nope.shape
            partner = q_nope.gather(-1, self.query_nope_partner[None, :, None, :].expand(b, h, s, -1))
            q_nope = q_nope * self.query_nope_mix[:, None, :, 0] + partner * self.query_nope_mix[:, None, :, 1]
        return q_nope, self.rope_query_of(query)

    def rope_query_of(self, query_BHSD):
        """The model's rotated query [B, H, S, Dh] → its rope part over the kept slots [B, H, S, 2S]."""
        if self.rope_query_mix is None:
            b, h, s, _ = query_BHSD.shape
            return query_BHSD.new_zeros(b, h, s, 0)
        return query_BHSD.index_select(-1, self.rope_value_dims) * self.rope_query_mix[None, :, None, :]

    def dropped_pair_positions(self) -> list[tuple[int, int, int, int]]:
        """(query head, index into ``plan.nope_pairs``, its two dims) for every rotary pair that
        head's kv head no longer rotates (unmixed slots: slot (k, j) is kv head j's pair k)."""
        kept = {tuple(slot) for slot in self.plan.rope_slots}
        return [(h, k, d0, d1) for h, j in enumerate(self.plan.kv_head_of_query)
                for k, (d0, d1) in enumerate(self.plan.nope_pairs or []) if (k, j) not in kept]

    def rope_keys(self, key_rope_full_BHkvSD, like_BSD):
        """The model's RoPE of ``rope_key(x)`` → the kept slots' rotated keys [B, 1, S, 2S]."""
        if key_rope_full_BHkvSD is None:
            b, s = like_BSD.shape[:2]
            return like_BSD.new_zeros(b, 1, s, 0)
        b, j, s, d = key_rope_full_BHkvSD.shape
        flat = key_rope_full_BHkvSD.transpose(1, 2).reshape(b, s, j * d)
        return flat.index_select(-1, self.rope_key_positions)[:, None]

    def mix_keys(self, key_BHkvSD):
        """The original's keys [B, Hkv, S, Dh] with each rotary pair mixed across kv heads (U_kᵀ k^(k)),
        laid out as ``rope_key``'s output: what ``rope_keys`` reads (rotation commutes with the mix)."""
        pairs = torch.tensor(self.plan.rope_pairs, dtype=torch.long, device=key_BHkvSD.device).reshape(-1)
        if pairs.numel() == 0:
            return key_BHkvSD
        b, j, s, _ = key_BHkvSD.shape
        vals = key_BHkvSD.index_select(-1, pairs).reshape(b, j, s, -1, 2)                 # [B,Hkv,S,P,2]
        mixed = torch.einsum("bgspd,pgj->bjspd", vals, self.rope_mix.to(vals.dtype))
        return key_BHkvSD.index_copy(-1, pairs, mixed.reshape(b, j, s, -1))

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
            scale = new["key_scale"].expand(-1, p.n_kv_heads, -1).index_select(1, self.rope_value_heads)  # [B,2S,S]
            new["rope_key"] = new["rope_key"] * scale.transpose(1, 2)[:, None]
        cached = len(past) > 0
        kinds = self.cache_kinds
        if cached:
            past, write_index = split_cache_args(past, self.cache_update)
            if len(past) != len(kinds):
                raise ValueError(f"{p.layer}: expected cache tensors {kinds}, got {len(past)}")
            if "latent_scale" in kinds:
                quantize = quantize_per_token_int4 if self.latent_cache == "int4" else quantize_per_token
                new["latent"], new["latent_scale"] = quantize(new["latent"])
            static = self.cache_update == "static"
            for kind, old in zip(kinds, past):
                new[kind] = update_cache(old, new[kind], cache_time_axis(kind), write_index, static)
            if self.latent_cache == "int4":      # attention reads one code a byte; the cache stays packed
                new["latent_codes"] = unpack_int4(new["latent"], p.latent_dim)
        if "rope_key" not in p.cache_kinds:            # no rope keys: zero-width over all keys
            latent = new["latent"]
            new["rope_key"] = latent.new_zeros(latent.shape[0], 1, latent.shape[1], 0)
        return new, cached

    @property
    def owns_projections(self) -> bool:
        """The site computes its own query and output projections (``lowering/absorb.py``)."""
        return self.query_latent is not None or self.query_nope_projection is not None

    def absorbed_projections(self, x_BSD, query_rope_full, new: dict, mask, cached: bool, valid_mask=None):
        """The site's own query and output projections (``math/absorption.py``) → the output
        projection's y [B, S, D]. Form "absorbed": W_uk and W_uv folded into them. Form "auto":
        prompts (S > 1) run the decompressed form over the scaled nope query and the output
        projection of [H·Dv]; one-token steps run the absorbed form, folded where that reads fewer
        weight bytes, else over the same two projections with W_uk / W_uv applied per head, so
        both forms share every weight. In an exported program that choice is one ONNX ``If`` per
        site (``ops.choose_form``).

        ``valid_mask``: bool [B, 1, S, T+S] over the keys written so far, where ``mask`` covers a
        preallocated buffer (in place); the decompressed form expands only those keys."""
        p = self.plan
        b, s = x_BSD.shape[:2]
        if self.rope_query is not None:        # the model's RoPE of rope_query(x), heads first like its core's query
            q_rope = self.rope_query_of(query_rope_full)
        else:
            q_rope = x_BSD.new_zeros(b, p.n_heads, s, 0)
        is_causal = p.is_causal and not cached
        latent, rope_key, scale = new.get("latent_codes", new["latent"]), new["rope_key"], new.get("latent_scale")
        folded = self.output_projection is not None
        q_nope = None
        if self.query_nope_projection is not None:           # scaled, the fitted map folded in: [B, H, S, Dh]
            q_nope = self.query_nope_projection(x_BSD).reshape(b, s, p.n_heads, -1).transpose(1, 2)

        def absorbed():       # → y [B, S, D] if folded, else the heads' outputs [B, H, S, Dv]
            if folded:
                q_latent = self.query_latent(x_BSD).reshape(b, s, p.n_heads, -1).transpose(1, 2)   # [B,H,S,C], scaled
            else:
                q_latent = self.per_query_head(q_nope, self.up_key)
            out_latent = latent_mqa(q_latent, q_rope, latent, rope_key, mask, is_causal, scale, self.latent_zero_point)
            if folded:
                return self.output_projection(out_latent.transpose(1, 2).reshape(b, s, -1))
            return self.per_query_head(out_latent, self.up_value.transpose(1, 2))

        if self.form != "auto" or q_nope is None:
            return absorbed()
        to_y = lambda out: self.value_output_projection(out.transpose(1, 2).reshape(b, s, -1))  # noqa: E731
        decompressed = lambda: self.decompressed_heads(q_nope, q_rope, latent, rope_key,          # noqa: E731
                                                       mask if valid_mask is None else valid_mask, is_causal, scale)
        if not (torch.compiler.is_exporting() or torch.compiler.is_compiling()):    # eager: S is known
            if s > 1:
                return to_y(decompressed())
            return absorbed() if folded else to_y(absorbed())
        if folded:                                                  # → one If per site (export/branches.py)
            return choose_form(x_BSD, absorbed(), to_y(decompressed()))
        return to_y(choose_form(x_BSD, absorbed(), decompressed()))

    def per_query_head(self, t_BHSX, w_HkvXY):
        """``math.attention.per_query_head`` for this site's kv-head map."""
        p = self.plan
        grouped = in_repeat_kv_order(p.kv_head_of_query, p.n_kv_heads)
        return per_query_head(t_BHSX, w_HkvXY, self.kv_head_of_query, grouped)

    def decompressed_heads(self, q_nope_BHSD, q_rope_BHSR, latent_BTC, rope_key_B1TR, keys_mask, is_causal: bool,
                           latent_scale_BT=None):
        """The decompressed form over pre-scaled queries: K/V expanded from the first T' latent rows
        (T' = the mask's key count), one attention op over [q_nope ; q_rope] → the heads' outputs
        [B, H, S, Dv], without the value bias (``value_output_projection`` holds it). The key bias
        is left out: softmax ignores a constant per query."""
        p = self.plan
        b = q_nope_BHSD.shape[0]
        s = q_nope_BHSD.shape[2]
        t = keys_mask.shape[-1] if keys_mask is not None else latent_BTC.shape[1]
        latent = latent_BTC[:, :t]
        if latent_scale_BT is not None:
            latent = dequantize_per_token(latent, latent_scale_BT[:, :t], self.latent_zero_point)
        per_head = lambda w: (latent @ w.reshape(-1, w.shape[-1]).T).reshape(b, t, p.n_kv_heads, -1).transpose(1, 2)  # noqa: E731
        k_nope, v = per_head(self.up_key), per_head(self.up_value)                            # [B, Hkv, T', ·]
        k = torch.cat([k_nope, rope_key_B1TR[:, :, :t].expand(-1, p.n_kv_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope_BHSD, q_rope_BHSR], dim=-1)
        grouped = in_repeat_kv_order(p.kv_head_of_query, p.n_kv_heads)
        if not grouped:
            k, v = expand_kv(k, self.kv_head_of_query), expand_kv(v, self.kv_head_of_query)
        bias = mask_bias(keys_mask, is_causal, s, t, q.dtype, q.device)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,
                                                          enable_gqa=grouped and p.n_heads > p.n_kv_heads)

    # -- the call the graph makes --------------------------------------------------------------
    def forward(self, x_BSD, query_raw, query, key_rope_full, mask, *past, valid_mask=None):
        """Without ``past``: out [B,H,S,Dv]. With the cache tensors of ``plan.cache_kinds``
        (each holding T earlier tokens): (out, *present) with T+S tokens each. ``valid_mask``: see
        ``absorbed_projections`` (in-place programs pass it)."""
        new, cached = self.cache_update_of(x_BSD, key_rope_full, past)
        if self.owns_projections:
            out = self.absorbed_projections(x_BSD, query, new, mask, cached, valid_mask)
        else:
            out = self.attention(query_raw, query, new, mask, cached)
        if cached:
            return (out, *(new[kind] for kind in self.cache_kinds))
        return out

    def attention(self, query_raw, query, new: dict, mask, cached: bool):
        """The model's own query against the cache tensors ``new``, in ``form`` → out [B,H,S,Dv]."""
        p = self.plan
        q_nope, q_rope = self.split_query(query_raw, query)
        latent, latent_scale = new.get("latent_codes", new["latent"]), new.get("latent_scale")
        key_scale = None
        if p.key_norm:
            key_scale = new["key_scale"].expand(-1, p.n_kv_heads, -1)                  # [B, Hkv, T]
        is_causal = p.is_causal and not cached
        form = self.form if self.form != "auto" else ("absorbed" if q_nope.shape[2] == 1 else "decompressed")
        if form == "absorbed":
            out = absorbed_decode(q_nope, q_rope, latent, new["rope_key"], self.up_key, self.up_value,
                                  self.value_bias, self.kv_head_of_query, p.scale, mask, is_causal, p.softcap,
                                  self.key_bias, key_scale, kv_heads=p.kv_head_of_query, use_kernel=self.decode_kernel,
                                  latent_scale_BT=latent_scale, latent_zero_point=self.latent_zero_point)
        else:
            if latent_scale is not None:
                latent = dequantize_per_token(latent, latent_scale, self.latent_zero_point)
            k_nope, v = self.decompress(latent)
            if key_scale is not None:
                k_nope = k_nope * key_scale[..., None]
            out = decompressed_attention(q_nope, q_rope, k_nope, new["rope_key"], v, self.kv_head_of_query, p.scale,
                                         mask, is_causal, p.softcap)
        return out
