"""Decoding over a static cache: buffers allocated once, one decode step of fixed shapes (CUDA-graph capturable).

``StaticCacheDecoder(step, cache_spec, plans, batch, capacity)`` holds one buffer per cache tensor
(``capacity`` tokens each) and the slot mask, and runs ``lowering.static_cache.to_static_cache(step)``
over them: ``decoder(ids, attention_mask)`` takes the same arguments as a step of
``MLAModel.step_with_cache`` (``attention_mask`` covers past and new tokens) and returns the
logits, writing the new tokens into the buffers in place. Every decode step (one token) calls the
program with the same shapes and buffers, so it can be compiled once (``compile``, ``COMPILES``):
``"reduce-overhead"`` is ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (inductor's
kernels, replayed as a CUDA graph on CUDA); ``"cudagraphs"`` replays the eager kernels (the Triton
decode kernel included) as a CUDA graph and compiles in seconds rather than minutes. Either way
the whole-model step stops being launch-bound; prompts run uncompiled.
"""
from __future__ import annotations

import torch
from torch import nn

from .lowering.static_cache import to_static_cache

COMPILES = {"reduce-overhead": dict(mode="reduce-overhead"), "cudagraphs": dict(backend="cudagraphs")}


class StaticCacheDecoder(nn.Module):
    def __init__(self, step, cache_spec, plans: dict, batch: int, capacity: int, compile: str | None = None):
        super().__init__()
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1 (prompt + new tokens), got {capacity!r}")
        if compile is not None and compile not in COMPILES:
            raise ValueError(f"compile must be None or one of {sorted(COMPILES)}, got {compile!r}")
        weight = next(step.parameters())
        self.program = to_static_cache(step)
        self.capacity, self.length = capacity, 0
        # buffers, not inputs: their addresses stay fixed, which CUDA graphs need
        for i, t in enumerate(cache_spec):
            shape = plans[t.site].cache_shape(t.kind, batch, capacity)
            self.register_buffer(f"cache_{i}", torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                                 persistent=False)
        self.n_cache = len(cache_spec)
        self.register_buffer("slots", torch.zeros(batch, capacity, dtype=torch.long, device=weight.device),
                             persistent=False)
        self.compiled = compile is not None
        self._decode_step = torch.compile(self._run, fullgraph=True, **COMPILES[compile]) if compile else self._run

    @property
    def caches(self) -> list[torch.Tensor]:
        return [getattr(self, f"cache_{i}") for i in range(self.n_cache)]

    def _run(self, input_ids, position_ids, slots, cache_position):
        logits, *_ = self.program(input_ids, position_ids, slots, *self.caches, cache_position)
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [B, S] after the ``length`` cached tokens; ``attention_mask`` [B, length + S]."""
        batch, new = input_ids.shape
        start, end = self.length, self.length + new
        if batch != self.slots.shape[0]:
            raise ValueError(f"this decoder was built for batch {self.slots.shape[0]}, got {batch} rows")
        if end > self.capacity:
            raise ValueError(f"{end} tokens do not fit the static cache of {self.capacity}: build the decoder "
                             "with a larger capacity (prompt + new tokens)")
        if tuple(attention_mask.shape) != (batch, end):
            raise ValueError(f"attention_mask must be [batch, cached + new] = {(batch, end)}, "
                             f"got {tuple(attention_mask.shape)}")
        self.slots[:, start:end] = attention_mask[:, start:end]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        cache_position = torch.arange(start, end, device=input_ids.device)
        run = self._decode_step if new == 1 else self._run
        logits = run(input_ids, position_ids, self.slots, cache_position)
        self.length = end
        return logits.clone() if self.compiled else logits     # a CUDA graph's output is overwritten by its next replay
