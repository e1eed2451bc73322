"""Absorbed latent attention as multi-query attention with the heads as rows (the form exported to ONNX).

The latent is shared by every head, so the absorbed form is multi-query attention with a single
key/value head of width C: keys = values = c_t. Stacking the H·S queries as rows makes the scores
one GEMM per sequence, ``[H·S, C] · latentᵀ``, and the output a second one, ``[H·S, T] · latent``:
the latent cache is read once per step for all heads, which is where decode time goes at long
context. The rope keys are one [B, 1, T, R] tensor shared by every head, so the rope part is one
more GEMM, ``[H·S, R] · rope_keyᵀ``, added together with the padding mask before the softmax:

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

from .int8_cache import ZERO_POINT, quantize_rows_int8, quantize_rows_uint8


def eligible(softcap, key_scale, kv_head_of_query: list[int], n_kv_heads: int) -> bool:
    """This form needs plain softmax scores and unscaled keys (any kv-head map: the rope keys are
    shared and the up-projections are gathered per query head)."""
    return softcap is None and key_scale is None


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


def absorbed_attention_mqa(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_B1TR, up_key_HkvNC, up_value_HkvVC,
                           b_value_HkvV, kv_head_of_query, scale: float, mask=None, is_causal=False,
                           latent_scale_BT=None, latent_zero_point: int = ZERO_POINT):
    """``latent_scale_BT``: the latent is the 8-bit cache of ``math/int8_cache.py`` (uint8 codes +
    ``latent_zero_point``: 128, or 8 for the unpacked 4-bit cache; one scale per token), read by
    ``integer_latent_attention``."""
    q_latent_BHSC = (q_nope_BHSN * scale) @ up_key_HkvNC.index_select(0, kv_head_of_query)     # [B,H,S,N]@[H,N,C]
    q_rope_BHSR = q_rope_BHSR * scale if q_rope_BHSR.shape[-1] else q_rope_BHSR
    out_latent = latent_mqa(q_latent_BHSC, q_rope_BHSR, latent_BTC, k_rope_B1TR, mask, is_causal,
                            latent_scale_BT, latent_zero_point)
    out = out_latent @ up_value_HkvVC.index_select(0, kv_head_of_query).transpose(-1, -2)     # [B,H,S,V]
    if b_value_HkvV is not None:
        out = out + b_value_HkvV.index_select(0, kv_head_of_query)[None, :, None, :]
    return out


def latent_mqa(q_latent_BHSC, q_rope_BHSR, latent_BTC, k_rope_B1TR, mask=None, is_causal=False,
               latent_scale_BT=None, latent_zero_point: int = ZERO_POINT):
    """softmax(q_latent·c_t + q_rope·k_rope_t + mask) · c_t → the heads' latent outputs [B,H,S,C]
    (queries already scaled)."""
    b, h, s, c = q_latent_BHSC.shape
    t = latent_BTC.shape[1]
    r = k_rope_B1TR.shape[-1]
    rope = None
    if r:
        # reshape, not [:, 0]: in ONNX a Gather would copy the whole rope cache every step
        rope = (q_rope_BHSR.reshape(b, h * s, r) @ k_rope_B1TR.reshape(b, t, r).transpose(1, 2)).reshape(b, h, s, t)
    bias = mask_bias(mask, is_causal, s, t, q_latent_BHSC.dtype, q_latent_BHSC.device)
    if latent_scale_BT is not None:
        return integer_latent_attention(q_latent_BHSC, latent_BTC, latent_scale_BT, rope, bias, latent_zero_point)
    scores = (q_latent_BHSC.reshape(b, h * s, c) @ latent_BTC.transpose(1, 2)).reshape(b, h, s, t)
    weights = torch.softmax(_plus(scores, rope, bias), dim=-1)
    return (weights.reshape(b, h * s, t) @ latent_BTC).reshape(b, h, s, c)                   # [B,H,S,C]


def _plus(scores, *terms):
    for x in terms:
        if x is not None:
            scores = scores + x
    return scores


def integer_latent_attention(q_latent_BHSC, codes_BTC, latent_scale_BT, rope_BHST=None, bias=None,
                             zero_point: int = ZERO_POINT):
    """softmax(q·c_t + rope + bias) · c_t over the 8-bit latent cache, both products in integers.

    scores: each query row is quantized to int8 (one scale per row), and ``codes · q_codesᵀ`` is
    one integer GEMM with the cache as its left operand, read as stored ([B,T,C] uint8, zero
    point 128, or 8 for the unpacked 4-bit cache; no transpose of the cache), → [B,T,R] int32, × query scale × token scale.
    output: the weights × token scales are quantized per row to uint8 (scale rowmax/255) and
    ``w_codes · codes`` is the second integer GEMM, × the row scale. The latent is never cast
    to float. Exported as onnxruntime's ``MatMulInteger`` (``mla_pass.ops.matmul_integer``)."""
    from ..ops.matmul_integer import matmul_integer

    b, h, s, c = q_latent_BHSC.shape
    t = codes_BTC.shape[1]
    dtype = q_latent_BHSC.dtype
    q_codes, q_scale = quantize_rows_int8(q_latent_BHSC.reshape(b, h * s, c))                 # [B,R,C], [B,R,1]
    scores = matmul_integer(codes_BTC, q_codes.transpose(1, 2), zero_point, 0)                # [B,T,R] int32
    scores = scores.transpose(1, 2).to(dtype) * q_scale * latent_scale_BT[:, None, :]         # [B,R,T]
    weights = torch.softmax(_plus(scores.reshape(b, h, s, t), rope_BHST, bias), dim=-1)
    weights = weights.reshape(b, h * s, t) * latent_scale_BT[:, None, :]
    w_codes, w_scale = quantize_rows_uint8(weights)                                            # [B,R,T], [B,R,1]
    out = matmul_integer(w_codes, codes_BTC, 0, zero_point).to(dtype) * w_scale               # [B,R,C]
    return out.reshape(b, h, s, c)
