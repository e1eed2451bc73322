"""Hugging Face ``DynamicCache`` holding the compressed (latent) cache under ``torch.compile``.

Why this exists: dynamo traces Hugging Face's Python, including ``DynamicLayer.update``, which
does ``self.keys = torch.cat([self.keys, key_states], dim=-2)``. Once the mla backend makes a
compiled graph store the compressed tensors in those slots, the NEXT trace would fail at
fake-tensor time: the traced Python concatenates a stored ``[B, Hkv, T, 2r]`` with a new
``[B, Hkv, S, Dh]``. So, while dynamo traces (and only then), ``DynamicLayer.update`` calls
one custom op instead of the two ``cat``:

    keys_BHkvTDh, values_BHkvTDv = mla_pass::cache_append(stored_k, stored_v, new_k, new_v)

- eager kernel: exactly DynamicLayer's two ``cat`` (same values, same dtype), so a graph that
  no pass rewrote (another backend, a site the mla backend left untouched) behaves as before;
- fake kernel: shape-agnostic in the stored tensors, ``[B, X, T, W] + S new tokens → full-width
  [B, Hkv, T+S, Dh]``, so tracing works whatever the slots hold;
- autograd: gradients split back onto stored and new tokens like ``cat``'s.

The backend then rewrites each attention site that reads a ``cache_append`` into latent
attention with past/present cache, and stores the compressed present in the two slots
(``pack_slots`` / ``unpack_slots`` below, the one place that layout is defined):

    key slot:   rope_key [B, 1, T, 2S]            value slot: latent [B, 1, T, C (+G)]
    (no rope keys:  key slot latent [B, 1, T, C (+G)],  value slot empty [B, 0, T, 0])

``+G``: sites with RMS-normalised keys (Qwen3, OLMo2) append their per-token key scale
``[B, G, T]`` to the latent's last axis. Axis -2 is always the token axis and the key slot is
never empty, so ``get_seq_length`` (``keys.shape[-2]``) and the mask bookkeeping stay right.

The patch is installed by importing ``mla_pass.dynamo.backend`` (which ``torch.compile(...,
backend="mla")`` does through the entry point). Outside dynamo tracing (eager runs,
``torch.export``) the original ``update`` runs, unchanged; the only addition is a clear error
where an eager call would concatenate new full K/V onto compressed slots.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.cache_append import CACHE_APPEND, cache_append  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------------------------
# the DynamicLayer patch
# --------------------------------------------------------------------------------------------
_ORIGINAL_UPDATE = None


def _traced_update(self, key_states, value_states, *args, **kwargs):
    if torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting():
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = torch.ops.mla_pass.cache_append(self.keys, self.values, key_states, value_states)
        return self.keys, self.values
    if self.is_initialized and self.keys.dim() == 4 and not slot_layout_matches(
            self.keys, self.values, key_states.shape, value_states.shape):
        raise RuntimeError("this cache holds the compressed tensors of torch.compile(backend='mla'): only the "
                           "compiled forward can extend it, and this call runs eagerly (did dynamo fall back to "
                           "eager, e.g. at its recompile limit?)")
    return _ORIGINAL_UPDATE(self, key_states, value_states, *args, **kwargs)


def install() -> bool:
    """Route ``DynamicLayer.update`` through ``cache_append`` while dynamo traces (idempotent).
    Returns False when transformers (or its DynamicLayer) is not available."""
    global _ORIGINAL_UPDATE
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    if DynamicLayer.update is not _traced_update:
        _ORIGINAL_UPDATE = DynamicLayer.update
        DynamicLayer.update = _traced_update
    return True


# --------------------------------------------------------------------------------------------
# the compressed layout in the two slots (pure tensor functions, called from rewritten graphs)
# --------------------------------------------------------------------------------------------
def unpack_slots(stored_k: Tensor | None, stored_v: Tensor | None, like_BSD: Tensor, latent_dim: int,
                 rope_width: int, scale_groups: int) -> tuple[Tensor, ...]:
    """The slots as the latent attention's past, in ``SitePlan.cache_kinds`` order:
    latent [B,T,C][, rope_key [B,1,T,2S]][, key_scale [B,G,T]]. ``None`` or DynamicLayer's
    initial 1-D empty tensors give T = 0."""
    batch = like_BSD.shape[0]
    if stored_k is None or stored_k.dim() < 2:
        past = [like_BSD.new_zeros(batch, 0, latent_dim)]
        if rope_width:
            past.append(like_BSD.new_zeros(batch, 1, 0, rope_width))
        if scale_groups:
            past.append(like_BSD.new_zeros(batch, scale_groups, 0))
        return tuple(past)
    packed = (stored_v if rope_width else stored_k)[:, 0]                   # [B, T, C + G]
    past = [packed[..., :latent_dim]]
    if rope_width:
        past.append(stored_k)
    if scale_groups:
        past.append(packed[..., latent_dim:].transpose(1, 2))
    return tuple(past)


def pack_slots(*present: Tensor, rope_width: int, scale_groups: int) -> tuple[Tensor, Tensor]:
    """The latent attention's present (``cache_kinds`` order) → (key slot, value slot)."""
    latent = present[0]
    rope_key = present[1] if rope_width else None
    if scale_groups:
        latent = torch.cat([latent, present[-1].transpose(1, 2)], dim=-1)
    packed = latent[:, None]                                                 # [B, 1, T, C + G]
    if rope_key is not None:
        return rope_key, packed
    b, _, t, _ = packed.shape
    return packed, packed.new_zeros(b, 0, t, 0)


def slot_layout_matches(stored_k: Tensor, stored_v: Tensor, new_k_shape, new_v_shape) -> bool:
    """True when the stored slots hold full K/V (the shape DynamicLayer would keep)."""
    if stored_k.dim() < 2:
        return True
    return (stored_k.dim() == 4 and stored_v.dim() == 4
            and stored_k.shape[1] == new_k_shape[1] and stored_k.shape[3] == new_k_shape[3]
            and stored_v.shape[1] == new_v_shape[1] and stored_v.shape[3] == new_v_shape[3])
