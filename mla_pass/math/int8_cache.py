"""Symmetric 8-bit quantization of cached latent vectors, one scale per token, and the row
quantizers of the integer attention that reads them.

A token's latent c_t is quantized to round(c_t / s_t) in [-127, 127] with s_t = max|c_t| / 127,
so the largest entry of every token is exact and the error is at most s_t / 2 per entry. A
per-token scale (not per channel) keeps appends independent: writing a token never rescales
what is already cached. The codes are stored as uint8 with zero point 128 (code + 128 in
[1, 255]): onnxruntime's integer GEMM is fast with a uint8 left operand (u8×s8 / u8×u8 on
VNNI) and several times slower with an int8 one, and the cache is the left operand of the
scores GEMM (``absorbed_mqa``). Scores and outputs are linear in c_t, so ``absorbed_mqa``
folds s_t into them instead of dequantizing the cache.
"""
from __future__ import annotations

import torch

LEVELS = 127
ZERO_POINT = 128            # stored code = round(c / s) + 128
WEIGHT_LEVELS = 255         # attention weights are ≥ 0: the full uint8 range
TINY = 1e-30                # an all-zero row keeps a positive scale (and stays zero)


def quantize_per_token(x_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B,T,C] float → (uint8 codes + 128 [B,T,C], scale [B,T] in x's dtype)."""
    scale = x_BTC.abs().amax(dim=-1) / LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))      # an all-zero token stays zero
    q = torch.round(x_BTC / scale[..., None]).clamp(-LEVELS, LEVELS) + ZERO_POINT
    return q.to(torch.uint8), scale


def dequantize_per_token(q_BTC: torch.Tensor, scale_BT: torch.Tensor) -> torch.Tensor:
    return (q_BTC.to(scale_BT.dtype) - ZERO_POINT) * scale_BT[..., None]


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per row (last axis): x ≈ codes · scale, codes int8 in [-127, 127], scale [..., 1]."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(TINY) / LEVELS
    return torch.round(x / scale).to(torch.int8), scale


def quantize_rows_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative x (attention weights) per row: x ≈ codes · scale, codes uint8 in [0, 255]."""
    scale = x.amax(dim=-1, keepdim=True).clamp_min(TINY) / WEIGHT_LEVELS
    return torch.round(x / scale).to(torch.uint8), scale
