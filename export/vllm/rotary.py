"""The rotation of a vLLM export's rope slots: pure torch, shared by the plugin and the reference.

Every cached rope slot is one rotary frequency pair (x0, x1) of the source model, turned by the
angle ``position · inv_freq`` as Hugging Face's ``rotate_half`` RoPE turns dims (k, k + D/2):
``(x0 cos − x1 sin, x1 cos + x0 sin)``, cos and sin scaled by the rope type's attention factor.
Slots sit side by side as (x0, x1) in the last dim; padding slots have frequency 0 and hold zeros.
vLLM's own rotary op is never used (its CPU kernel corrupts MLA's strided views).
"""
from __future__ import annotations

import torch


def rotate_slots(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """x [T, ..., 2P] (P slots as (x0, x1)) turned by each token's position → same shape.

    ``positions`` [T] (integers), ``inv_freq`` [P] (float32). cos/sin are computed in float32 as
    Hugging Face does (``position · inv_freq``, then cos and sin, times ``scaling``), then cast."""
    angle = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]          # [T, P]
    cos = (angle.cos() * scaling).to(x.dtype)
    sin = (angle.sin() * scaling).to(x.dtype)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (inv_freq.shape[0],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
