"""Cache tensors of the attention modules: their token axis and how new tokens are written (concat or in place)."""
from __future__ import annotations

import torch

from ..ops.cache_write import cache_write


def split_cache_args(past: tuple, cache_update: str):
    """(cache tensors, write index or None): in-place and static programs pass the write index last."""
    if cache_update in ("in_place", "static"):
        return past[:-1], past[-1]
    return past, None


def cache_time_axis(kind: str) -> int:
    """The token axis of a cache tensor: [B, T, ·] for the latent and its int8 scales, [B, heads, T, ·]
    for everything kept per head (rope keys, key scales, the baseline's keys and values)."""
    return 1 if kind in ("latent", "latent_scale") else 2


def update_cache(old, new, axis: int, write_index=None, static: bool = False):
    """Concatenate ``new`` after ``old`` along ``axis``, or write it into the preallocated ``old``
    at ``write_index`` (one ``cache_write`` op, exported as TensorScatter). ``static``: ``old`` is
    a buffer that is written in place at the positions ``write_index`` [S] (the same for every row:
    prompts are left-padded), as gpt-fast's static cache; no copy, no host sync."""
    if write_index is None:
        return torch.cat([old, new], dim=axis)
    if static:
        return old.index_copy_(axis, write_index, new)
    return cache_write(old, new, write_index, axis)
