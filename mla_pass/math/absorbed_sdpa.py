"""Absorbed latent attention as one multi-query SDPA call (the form exported to ONNX).

The latent is shared by every head, so the absorbed form is multi-query attention with a single
key/value head of width C: keys = values = c_t. The rope part of each score differs per kv head;
it is computed separately (one batched matmul per kv group) and enters as an additive bias,
together with the padding mask:

    softmax(scale · q_latent·c_t + [scale · q_rope·k_rope_t + mask_bias]) · c_t

This is the absorbed form's math (``attention.absorbed_attention``) in an op sequence that
exporters and kernels handle well: ``scaled_dot_product_attention(enable_gqa=True)`` becomes
ONNX's ``Attention`` op with one kv head, reading the latent cache once for scores and once for
values with no per-head copies. The key bias is dropped: it adds the same q_nope·b_k to every
score of a query, which softmax ignores (valid only without softcapping, see ``eligible``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def eligible(softcap, key_scale, kv_head_of_query: list[int], n_kv_heads: int) -> bool:
    """The SDPA form needs plain softmax scores, unscaled keys, and query heads grouped
    contiguously by kv head (h → h // g), so the rope scores are one batched matmul."""
    n_heads = len(kv_head_of_query)
    g = n_heads // n_kv_heads
    return softcap is None and key_scale is None and list(kv_head_of_query) == [h // g for h in range(n_heads)]


def mask_bias(mask, is_causal: bool, s: int, t: int, dtype, device):
    """bool (True attends) or additive mask, plus causality → additive float bias or None.
    A large finite negative, not −inf, so rows with nothing to attend to stay finite."""
    neg = torch.finfo(dtype).min / 2
    bias = None
    if is_causal:
        keep = torch.ones(s, t, dtype=torch.bool, device=device).tril(t - s)
        bias = torch.zeros(s, t, dtype=dtype, device=device).masked_fill(~keep, neg)
    if mask is not None:
        m = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, neg) \
            if mask.dtype == torch.bool else mask.to(dtype)
        bias = m if bias is None else bias + m
    return bias


def absorbed_attention_sdpa(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_BHkvTR, up_key_HkvNC, up_value_HkvVC,
                            b_value_HkvV, kv_head_of_query, scale: float, mask=None, is_causal=False):
    b, h, s, _ = q_nope_BHSN.shape
    t = latent_BTC.shape[1]
    n_kv = up_key_HkvNC.shape[0]
    g = h // n_kv
    q_latent_BHSC = q_nope_BHSN @ up_key_HkvNC.index_select(0, kv_head_of_query)          # [B,H,S,N]@[H,N,C]
    bias = mask_bias(mask, is_causal, s, t, q_nope_BHSN.dtype, q_nope_BHSN.device)
    r = k_rope_BHkvTR.shape[-1]
    if r:
        rope = q_rope_BHSR.reshape(b, n_kv, g * s, r) @ k_rope_BHkvTR.transpose(-1, -2)     # [B,Hkv,g·S,T]
        rope = rope.reshape(b, h, s, t) * scale
        bias = rope if bias is None else rope + bias
    latent_B1TC = latent_BTC.unsqueeze(1)
    out_latent = F.scaled_dot_product_attention(q_latent_BHSC, latent_B1TC, latent_B1TC, attn_mask=bias,
                                                scale=scale, enable_gqa=True)                # [B,H,S,C]
    out = out_latent @ up_value_HkvVC.index_select(0, kv_head_of_query).transpose(-1, -2)   # [B,H,S,V]
    if b_value_HkvV is not None:
        out = out + b_value_HkvV.index_select(0, kv_head_of_query)[None, :, None, :]
    return out
