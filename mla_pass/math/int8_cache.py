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

The 4-bit cache (``latent_cache="int4"``) rounds to [-7, 7] with s_t = max|c_t| / 7 and stores two
codes a byte, code + 8 in each nibble (channel 2i in the low nibble, 2i+1 in the high one; an odd
width is padded with a zero code): [B, T, ⌈C/2⌉] uint8 plus the same per-token scale. Reading
unpacks it to one code + 8 a byte (``unpack_int4``), which the same integer attention takes with
zero point 8: byte products stay ≤ 15 · 127, so even onnxruntime's AVX2 u8×s8 kernel, which
saturates int16 pair sums of larger bytes, computes them exactly.
The arithmetic is done in int32, not with bit shifts: ``torch.onnx`` writes uint8 shifts as
signed int8 ones.
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


LEVELS_4BIT = 7
ZERO_POINT_4BIT = 8         # a nibble = round(c / s) + 8


def quantize_per_token_int4(x_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B,T,C] float → (packed codes [B,T,⌈C/2⌉] uint8, scale [B,T] in x's dtype)."""
    scale = x_BTC.abs().amax(dim=-1) / LEVELS_4BIT
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x_BTC / scale[..., None]).clamp(-LEVELS_4BIT, LEVELS_4BIT).to(torch.int32) + ZERO_POINT_4BIT
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1), value=ZERO_POINT_4BIT)
    return (q[..., 0::2] + q[..., 1::2] * 16).to(torch.uint8), scale


def unpack_int4(packed_BTP: torch.Tensor, width: int) -> torch.Tensor:
    """Packed 4-bit codes [B,T,⌈C/2⌉] → one code + 8 a byte [B,T,C] uint8 (zero point ``ZERO_POINT_4BIT``)."""
    if packed_BTP.dtype != torch.uint8 or packed_BTP.shape[-1] != (width + 1) // 2:
        raise ValueError(f"a 4-bit latent of width {width} is [..., {(width + 1) // 2}] uint8, got "
                         f"{tuple(packed_BTP.shape)} {packed_BTP.dtype}")
    b, t, _ = packed_BTP.shape
    wide = packed_BTP.to(torch.int32)
    high = torch.div(wide, 16, rounding_mode="floor")
    return torch.stack([wide - high * 16, high], dim=-1).reshape(b, t, -1)[..., :width].to(torch.uint8)


def dequantize_per_token(q_BTC: torch.Tensor, scale_BT: torch.Tensor, zero_point: int = ZERO_POINT) -> torch.Tensor:
    return (q_BTC.to(scale_BT.dtype) - zero_point) * scale_BT[..., None]


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per row (last axis): x ≈ codes · scale, codes int8 in [-127, 127], scale [..., 1]."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(TINY) / LEVELS
    return torch.round(x / scale).to(torch.int8), scale


def quantize_rows_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative x (attention weights) per row: x ≈ codes · scale, codes uint8 in [0, 255]."""
    scale = x.amax(dim=-1, keepdim=True).clamp_min(TINY) / WEIGHT_LEVELS
    return torch.round(x / scale).to(torch.uint8), scale
