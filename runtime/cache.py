"""Preallocated KV-cache buffers bound to an onnxruntime session with IO binding.

What IO binding can and cannot save. With the contract's ``cache_update="concat"`` the program
computes ``present = Concat(past, new)``: onnxruntime itself writes all T+S tokens of every
cache tensor each step, and no binding avoids that copy (an output may not alias an input of
the same Concat, and a prefix of a [B, T_max, ...] buffer is contiguous only for batch 1).
Here each entry has two flat buffers of ``batch × capacity × values_per_token`` elements
(ping-pong): a step reads the past as the contiguous [B, T, ...] prefix of one, onnxruntime
writes the present as the [B, T+S, ...] prefix of the other, which is the next step's past: no
allocation and nothing crosses to numpy. On CPU that gains nothing measurable over plain
``session.run`` (its outputs already wrap onnxruntime's memory without a copy, and re-binding
2 × 60 tensors costs ~0.7 ms a step); on CUDA it keeps the cache on the device.

With ``cache_update="in_place"`` (the program updates its cache with ``TensorScatter`` at index
T, opset 24) each entry has ONE buffer of [B, capacity, ...], bound as both the past input and
the present output, once; onnxruntime's TensorScatter sees the same address and skips its copy,
so a step writes only the new tokens. Measured per decode step with
``python benchmarks/runtime_cache.py`` (toy decoder whose 30 layers only write a cache of
SmolLM2-135M's sizes; batch 1, 2 threads, 2-core CPU shared with other jobs, so ±50% noise;
medians of 30 steps, ms)::

    cache (fp32)                     past:   512    2048    8192
    MLA d_kv=32 (14,400 B/token)  run        6.6    16.2    45.6
                                  bound      7.5    28.2    47.8
                                  in place   0.42   0.48    0.22
    original (46,080 B/token)     run       12.7    36.9   161.6
                                  bound     17.1    50.3   143.2
                                  in place   0.48   0.29    0.57
    (numpy memcpy of the whole cache: 1.0 / 7.5 / 18.3 ms and 2.6 / 18.0 / 65.4 ms)

Names carry shapes: B batch, T cached tokens, S new tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import CacheEntry

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}


class CacheError(ValueError):
    """Cache tensors that do not fit the engine; the message names the entry."""


def check_cache(entries: list[CacheEntry], arrays, batch: int, past: int) -> list[np.ndarray]:
    """The caller's past tensors (a list in manifest order, or a dict by input name), checked
    against the manifest: one per entry, each of shape ``concrete_shape(batch, past)`` and the
    entry's dtype."""
    if isinstance(arrays, dict):
        unknown = sorted(set(arrays) - {e.input for e in entries})
        if unknown:
            raise CacheError(f"unknown cache entries {unknown}; the engine's are {[e.input for e in entries]}")
        missing = [e.input for e in entries if e.input not in arrays]
        if missing:
            raise CacheError(f"cache entries missing: {missing}")
        arrays = [arrays[e.input] for e in entries]
    arrays = list(arrays)
    if len(arrays) != len(entries):
        raise CacheError(f"expected {len(entries)} cache tensors (one per manifest entry: "
                         f"{[e.input for e in entries]}), got {len(arrays)}")
    for e, a in zip(entries, arrays):
        want = e.concrete_shape(batch, past)
        if not isinstance(a, np.ndarray):
            raise CacheError(f"cache entry {e.input}: expected a numpy array of shape {want} and dtype {e.dtype}, "
                             f"got {type(a).__name__}")
        if a.shape != want:
            raise CacheError(f"cache entry {e.input}: expected shape {want} (batch {batch}, {past} cached tokens on "
                             f"axis {e.time_axis}), got {a.shape}")
        if a.dtype != NUMPY_DTYPES[e.dtype]:
            raise CacheError(f"cache entry {e.input}: expected dtype {e.dtype}, got {a.dtype}")
    return arrays


@dataclass
class _Slot:
    entry: CacheEntry
    buffers: list          # numpy arrays (CPU) or OrtValues (device): 2 for concat, 1 for in place

    def pointer(self, i: int) -> int:
        b = self.buffers[i]
        return b.ctypes.data if isinstance(b, np.ndarray) else b.data_ptr()


class KVCache:
    """Cache buffers for one batch of ``batch`` rows and up to ``capacity`` tokens.

    ``bind(binding, new)`` binds every past input and present output for a step that adds
    ``new`` tokens; ``advance(new)`` records that the step ran. ``load`` / ``arrays`` move a
    cache in and out as numpy ([B, T, ...] per entry, manifest order).
    """

    def __init__(self, entries: list[CacheEntry], batch: int, capacity: int, update: str = "concat",
                 device: str = "cpu", device_id: int = 0):
        if batch < 1 or capacity < 1:
            raise ValueError(f"batch and capacity must be >= 1, got {batch} and {capacity}")
        if update not in ("concat", "in_place"):
            raise ValueError(f"cache update must be 'concat' or 'in_place', got {update!r}")
        self.entries, self.batch, self.capacity, self.update = list(entries), batch, capacity, update
        self.device, self.device_id = device, device_id
        self.length = 0
        self._current = 0           # which of the two concat buffers holds the past
        copies = 2 if update == "concat" else 1
        self._slots = [_Slot(e, [self._allocate(e) for _ in range(copies)]) for e in self.entries]

    def _allocate(self, e: CacheEntry):
        dtype = NUMPY_DTYPES[e.dtype]
        if self.update == "in_place":
            shape = e.concrete_shape(self.batch, self.capacity)
        else:
            shape = (self.batch * self.capacity * e.values_per_token(),)
        if self.device == "cpu":
            return np.zeros(shape, dtype=dtype)
        import onnxruntime as ort
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(self._shape_of(b))) * np.dtype(NUMPY_DTYPES[s.entry.dtype]).itemsize
                   for s in self._slots for b in s.buffers)

    @staticmethod
    def _shape_of(b):
        return b.shape if isinstance(b, np.ndarray) else tuple(b.shape())

    def reset(self) -> None:
        self.length, self._current = 0, 0

    def bind(self, binding, new: int) -> None:
        total = self.length + new
        if total > self.capacity:
            raise CacheError(f"the cache holds at most {self.capacity} tokens; this step needs {total} "
                             f"({self.length} cached + {new} new): allocate a larger cache")
        for s in self._slots:
            dtype = NUMPY_DTYPES[s.entry.dtype]
            if self.update == "in_place":
                shape = list(s.entry.concrete_shape(self.batch, self.capacity))
                binding.bind_input(s.entry.input, self.device, self.device_id, dtype, shape, s.pointer(0))
                binding.bind_output(s.entry.output, self.device, self.device_id, dtype, shape, s.pointer(0))
            else:
                past, present = self._current, 1 - self._current
                binding.bind_input(s.entry.input, self.device, self.device_id, dtype,
                                   list(s.entry.concrete_shape(self.batch, self.length)), s.pointer(past))
                binding.bind_output(s.entry.output, self.device, self.device_id, dtype,
                                    list(s.entry.concrete_shape(self.batch, total)), s.pointer(present))

    def advance(self, new: int) -> None:
        self.length += new
        if self.update == "concat":
            self._current = 1 - self._current

    # -- numpy in and out -----------------------------------------------------------------------
    def _host(self, s: _Slot) -> np.ndarray:
        b = s.buffers[self._current if self.update == "concat" else 0]
        return b if isinstance(b, np.ndarray) else b.numpy()

    def arrays(self) -> list[np.ndarray]:
        """Copies of the cached tokens, [B, T, ...] per entry (T = ``length``)."""
        out = []
        for s in self._slots:
            host = self._host(s)
            if self.update == "in_place":
                index = [slice(None)] * host.ndim
                index[s.entry.time_axis] = slice(0, self.length)
                out.append(host[tuple(index)].copy())
            else:
                shape = s.entry.concrete_shape(self.batch, self.length)
                out.append(host[: int(np.prod(shape))].reshape(shape).copy())
        return out

    def load(self, arrays, past: int | None = None) -> None:
        """Put a cache of ``past`` tokens (checked like ``check_cache``) into the buffers."""
        if past is None:
            first = arrays[self.entries[0].input] if isinstance(arrays, dict) else list(arrays)[0]
            past = np.shape(first)[self.entries[0].time_axis]
        if past > self.capacity:
            raise CacheError(f"a cache of {past} tokens does not fit a capacity of {self.capacity} tokens")
        arrays = check_cache(self.entries, arrays, self.batch, past)
        self.reset()
        for s, a in zip(self._slots, arrays):
            host = self._host(s) if self.device == "cpu" else np.zeros(self._shape_of(s.buffers[0]), a.dtype)
            if self.update == "in_place":
                index = [slice(None)] * host.ndim
                index[s.entry.time_axis] = slice(0, past)
                host[tuple(index)] = a
            else:
                host[: a.size] = a.reshape(-1)
            if self.device != "cpu":
                s.buffers[0].update_inplace(host)
        self.length = past
