"""Absorbed latent attention as multi-query attention with the heads as rows (the form exported to ONNX).

The latent is shared by every head, so the absorbed form is multi-query attention with a single
key/value head of width C: keys = values = c_t. Stacking the H·S queries as rows makes the scores
one GEMM per sequence, ``[H·S, C] · latentᵀ``, and the output a second one, ``[H·S, T] · latent``:
the latent cache is read once per step for all heads, which is where decode time goes at long
context. The rope part of each score differs per kv head; it is one batched matmul per kv group,
added together with the padding mask before the softmax:

    softmax(q_latent·c_t + q_rope·k_rope_t + mask_bias) · c_t        (queries pre-scaled)

This is the absorbed form's math (``attention.absorbed_attention``) in the op sequence that ran
fastest in onnxruntime (``benchmarks/attention_ops.py``: MatMul/Softmax/MatMul beat the ONNX
``Attention`` op with one kv head by ~2× at 8k tokens, and ``GroupQueryAttention`` with the latent
bound as both key and value). The softmax scale multiplies the [H,S,·] queries, not the [H,S,T]
scores. The key bias is dropped: it adds the same q_nope·b_k to every score of a query, which
softmax ignores (valid only without softcapping, see ``eligible``).
"""
from __future__ import annotations

import torch

from .attention import in_repeat_kv_order


def eligible(softcap, key_scale, kv_head_of_query: list[int], n_kv_heads: int) -> bool:
    """This form needs plain softmax scores, unscaled keys, and query heads grouped
    contiguously by kv head (h → h // g), so the rope scores are one batched matmul."""
    return softcap is None and key_scale is None and in_repeat_kv_order(kv_head_of_query, n_kv_heads)


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


def absorbed_attention_mqa(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_BHkvTR, up_key_HkvNC, up_value_HkvVC,
                           b_value_HkvV, kv_head_of_query, scale: float, mask=None, is_causal=False,
                           latent_scale_BT=None):
    """``latent_scale_BT``: the latent is int8 with one scale per token (``math/int8_cache.py``);
    the scale multiplies each key's score and each key's weight, so the cache is only cast."""
    b, h, s, _ = q_nope_BHSN.shape
    t, c = latent_BTC.shape[1:]
    if latent_scale_BT is not None:
        latent_BTC = latent_BTC.to(q_nope_BHSN.dtype)
    n_kv = up_key_HkvNC.shape[0]
    g = h // n_kv
    q_latent_BHSC = (q_nope_BHSN * scale) @ up_key_HkvNC.index_select(0, kv_head_of_query)     # [B,H,S,N]@[H,N,C]
    scores = (q_latent_BHSC.reshape(b, h * s, c) @ latent_BTC.transpose(1, 2)).reshape(b, h, s, t)
    if latent_scale_BT is not None:
        scores = scores * latent_scale_BT[:, None, None, :]
    r = k_rope_BHkvTR.shape[-1]
    if r:
        rope = (q_rope_BHSR * scale).reshape(b, n_kv, g * s, r) @ k_rope_BHkvTR.transpose(-1, -2)  # [B,Hkv,g·S,T]
        scores = scores + rope.reshape(b, h, s, t)
    bias = mask_bias(mask, is_causal, s, t, scores.dtype, scores.device)
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1)
    if latent_scale_BT is not None:
        weights = weights * latent_scale_BT[:, None, None, :]
    out_latent = (weights.reshape(b, h * s, t) @ latent_BTC).reshape(b, h, s, c)               # [B,H,S,C]
    out = out_latent @ up_value_HkvVC.index_select(0, kv_head_of_query).transpose(-1, -2)     # [B,H,S,V]
    if b_value_HkvV is not None:
        out = out + b_value_HkvV.index_select(0, kv_head_of_query)[None, :, None, :]
    return out
