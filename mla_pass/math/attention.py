"""The two forms of latent attention, as pure functions.

Letters: B batch, H query heads, Hkv kv heads, S queries, T keys, N unrotated dims per head
(all Dh of them), R rotated values of the kept rope slots (2 per slot; one key [B, 1, T, R]
shared by every query head), C latent width, V value head dim.

decompressed: k_nope = W_uk·c + b, v = W_uv·c + b, then ordinary attention over
              [q_nope ; q_rope]·[k_nope ; k_rope] (a permutation of the original dims, so the
              scores are the original ones).
absorbed:     q_latent_h = W_ukʲᵀ q_nope_h, score = q_latent·c_t + q_rope·k_rope_t; the output
              is W_uvʲ Σ_t a_t c_t + b_v. The key bias adds q_nope·b_k, the same for every key of
              a query: softmax alone would drop it, softcapping (tanh) would not, so it is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def in_repeat_kv_order(kv_head_of_query, n_kv_heads: int) -> bool:
    """Query head h reads kv head h // (H / Hkv), as ``repeat_kv`` lays them out: the groups are
    contiguous, so per-group work is one batched op over [Hkv, H / Hkv]."""
    n_heads = len(kv_head_of_query)
    if n_heads % n_kv_heads:
        return False
    g = n_heads // n_kv_heads
    return list(kv_head_of_query) == [h // g for h in range(n_heads)]


def expand_kv(t_BHkvTX: torch.Tensor, kv_head_of_query: torch.Tensor) -> torch.Tensor:
    return t_BHkvTX.index_select(1, kv_head_of_query)


def attention_probs_apply(scores_BHST: torch.Tensor, mask, is_causal: bool, softcap: float | None) -> torch.Tensor:
    """softmax over keys in float32 after [softcap] and mask (bool: True attends; float: added).

    Masked scores get float32's lowest finite value, not −inf, as Hugging Face's eager attention
    does: a fully masked row (a left-padding query) then averages finite values instead of giving
    NaN, which would enter the cache and spread through 0·NaN at every later step."""
    s = scores_BHST.float()
    lowest = torch.finfo(s.dtype).min
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if is_causal:
        q_len, k_len = s.shape[-2:]
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, lowest)
    if mask is not None:
        s = s.masked_fill(~mask, lowest) if mask.dtype == torch.bool else (s + mask.float()).clamp(min=lowest)
    return torch.softmax(s, dim=-1)


def decompressed_attention(q_nope_BHSN, q_rope_BHSR, k_nope_BHkvTN, k_rope_B1TR, v_BHkvTV,
                           kv_head_of_query, scale: float, mask=None, is_causal=False, softcap=None):
    q = torch.cat([q_nope_BHSN, q_rope_BHSR], dim=-1)
    k_rope = k_rope_B1TR.expand(-1, k_nope_BHkvTN.shape[1], -1, -1)       # shared: the same for every kv head
    k = expand_kv(torch.cat([k_nope_BHkvTN, k_rope], dim=-1), kv_head_of_query)
    v = expand_kv(v_BHkvTV, kv_head_of_query)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    probs = attention_probs_apply(q @ k.transpose(-1, -2) * scale, mask, is_causal, softcap)
    return (probs.to(v.dtype) @ v)


def latent_query(q_nope_BHSN, up_key_HkvNC, kv_head_of_query):
    """W_ukʲᵀ q_nope_h: the query in latent space → [B, H, S, C]."""
    return torch.einsum("bhsn,hnc->bhsc", q_nope_BHSN, up_key_HkvNC.index_select(0, kv_head_of_query))


def per_query_head(t_BHSX, w_HkvXY, kv_head_of_query, grouped: bool):
    """Each query head's rows times its kv head's [X, Y] matrix → [B, H, S, Y]: ``latent_query``
    (w = W_uk) and ``latent_output`` (w = W_uvᵀ, no bias) as plain MatMuls. ``grouped`` (heads in
    ``in_repeat_kv_order``): one batched product per kv head, so an exported graph holds no
    per-query-head copy of the weight."""
    if grouped:
        b, h, s, x = t_BHSX.shape
        n_kv = w_HkvXY.shape[0]
        return (t_BHSX.reshape(b, n_kv, (h // n_kv) * s, x) @ w_HkvXY).reshape(b, h, s, -1)
    return t_BHSX @ w_HkvXY.index_select(0, kv_head_of_query)


def key_bias_score(q_nope_BHSN, b_key_HkvN, kv_head_of_query):
    """q_nope_h·b_k: the key bias's share of every score of a query → [B, H, S, 1]."""
    return (q_nope_BHSN * b_key_HkvN.index_select(0, kv_head_of_query)[None, :, None, :]).sum(-1, keepdim=True)


def latent_output(out_latent_BHSC, up_value_HkvVC, b_value_HkvV, kv_head_of_query):
    """W_uvʲ (Σ_t a_t c_t) [+ b_v] → [B, H, S, V]."""
    out = torch.einsum("bhsc,hvc->bhsv", out_latent_BHSC, up_value_HkvVC.index_select(0, kv_head_of_query))
    if b_value_HkvV is not None:
        out = out + b_value_HkvV.index_select(0, kv_head_of_query)[None, :, None, :]
    return out


def absorbed_attention(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_B1TR, up_key_HkvNC, up_value_HkvVC,
                       b_value_HkvV, kv_head_of_query, scale: float, mask=None, is_causal=False, softcap=None,
                       b_key_HkvN=None, key_scale_BHkvT=None):
    q_latent_BHSC = latent_query(q_nope_BHSN, up_key_HkvNC, kv_head_of_query)
    scores = torch.einsum("bhsc,btc->bhst", q_latent_BHSC, latent_BTC)
    if b_key_HkvN is not None:
        scores = scores + key_bias_score(q_nope_BHSN, b_key_HkvN, kv_head_of_query)
    if key_scale_BHkvT is not None:        # RMS-normalised keys: k_nope_t = s_t·(W_uk c_t + b)
        scores = scores * expand_kv(key_scale_BHkvT, kv_head_of_query)[:, :, None, :]
    if k_rope_B1TR.shape[-1]:
        scores = scores + q_rope_BHSR @ k_rope_B1TR.transpose(-1, -2)
    probs = attention_probs_apply(scores * scale, mask, is_causal, softcap).to(latent_BTC.dtype)
    out_latent_BHSC = torch.einsum("bhst,btc->bhsc", probs, latent_BTC)
    return latent_output(out_latent_BHSC, up_value_HkvVC, b_value_HkvV, kv_head_of_query)
