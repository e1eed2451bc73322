"""Symmetric int8 quantization of cached latent vectors, one scale per token.

A token's latent c_t is stored as round(c_t / s_t) in [-127, 127] with s_t = max|c_t| / 127, so
the largest entry of every token is exact and the error is at most s_t / 2 per entry. A
per-token scale (not per channel) keeps appends independent: writing a token never rescales
what is already cached. Scores and outputs are linear in c_t, so ``absorbed_mqa`` folds s_t
into them instead of dequantizing the cache.
"""
from __future__ import annotations

import torch

LEVELS = 127


def quantize_per_token(x_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B,T,C] float → (int8 [B,T,C], scale [B,T] in x's dtype)."""
    scale = x_BTC.abs().amax(dim=-1) / LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))      # an all-zero token stays zero
    q = torch.round(x_BTC / scale[..., None]).clamp(-LEVELS, LEVELS).to(torch.int8)
    return q, scale


def dequantize_per_token(q_BTC: torch.Tensor, scale_BT: torch.Tensor) -> torch.Tensor:
    return q_BTC.to(scale_BT.dtype) * scale_BT[..., None]
