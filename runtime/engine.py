"""``OnnxEngine``: run an exported folder with onnxruntime — one step, or whole generations.

    engine = OnnxEngine("out/smollm2-mla", threads=2)          # verifies the manifest's hashes
    result = engine.generate(["The capital of France is", "Once upon"], max_new_tokens=32)
    result.texts, result.token_ids                               # per prompt, prompt excluded
    out = engine.step(input_ids_BS, attention_mask_BK, position_ids_BS, cache)   # low level

Batches of prompts of different lengths are LEFT-padded: ``attention_mask`` marks real tokens
and position ids are ``cumsum(mask) − 1`` clamped at 0, as Hugging Face does, so each row sees
exactly what it would see alone. A row stops at an end id (the manifest's ``eos_token_ids`` or
``stop`` ids) or a ``stop`` string; finished rows keep stepping with the pad id until all are
done (their tokens are discarded). ``prompt + max_new_tokens`` must fit ``manifest.max_length``:
a request that cannot be completed is refused up front rather than cut short.

Decoding runs on a ``KVCache`` (``cache.py``): buffers preallocated to the longest prompt +
``max_new_tokens`` and bound with IO binding. Prompts are fed through that cache in chunks of
``prefill_chunk`` tokens: the program is causal, so the logits are those of one step over the
whole prompt, but an attention's scores take chunk × (past + chunk) values instead of S × S
(an 8,192-token prompt through a converted model's absorbed attention: 14 GB in one step). The execution provider is CUDA when this
onnxruntime offers it, else CPU, unless ``providers`` names them.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from .cache import NUMPY_DTYPES, CacheError, KVCache, check_cache
from .manifest import Manifest, ManifestError
from .results import Completion, GenerationResult, StepOutput
from .sampling import SamplingConfig, sample
from .text import IncrementalDecoder, find_stop, held_back

logger = logging.getLogger(__name__)

ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)",
             "uint8": "tensor(uint8)", "int64": "tensor(int64)"}
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


PREFILL_CHUNK = 256       # prompt tokens per prefill step: least memory at no cost in time (benchmarks/results/prefill)


def _check_chunk(chunk):
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"prefill_chunk must be an integer >= 1 (prompt tokens per step) or None, got {chunk!r}")
    return chunk


class EngineError(RuntimeError):
    """onnxruntime cannot run this folder's model as the manifest describes it."""


def positions(attention_mask_BK: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch: cumsum(mask) − 1, clamped at 0 (Hugging Face's rule)."""
    return np.maximum(np.cumsum(attention_mask_BK, axis=-1) - 1, 0).astype(np.int64)


def choose_providers(providers=None) -> list[str]:
    """CUDA then CPU when available; names may be shorthand ("cpu", "cuda")."""
    available = ort.get_available_providers()
    if providers is None:
        wanted = [p for p in ("CUDAExecutionProvider",) if p in available]
    else:
        wanted = [PROVIDER_NAMES.get(p.lower(), p) for p in ([providers] if isinstance(providers, str) else providers)]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ValueError(f"execution provider(s) {missing} not available in this onnxruntime {ort.__version__}; "
                             f"available: {available}")
    return wanted + ([] if "CPUExecutionProvider" in wanted else ["CPUExecutionProvider"])


class OnnxEngine:
    """An exported folder ready to run: manifest, onnxruntime session, tokenizer.

    Args:
        folder: written by ``mla_pass.export.to_onnx``.
        providers: execution providers (names or "cpu"/"cuda"); default CUDA if available, else CPU.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        verify: check the SHA-256 of every file against the manifest first.
        prefill_chunk: prompt tokens per step in ``generate`` (``PREFILL_CHUNK``, chosen by
            ``benchmarks/decode.py --prompt-tokens``); None feeds a prompt in one step.
    """

    def __init__(self, folder, providers=None, threads: int | None = None, verify: bool = True,
                 prefill_chunk: int | None = PREFILL_CHUNK):
        self.folder = Path(folder)
        self.prefill_chunk = _check_chunk(prefill_chunk)
        if not self.folder.is_dir():
            raise ManifestError(f"{self.folder} is not a folder: give the folder written by mla_pass.export.to_onnx")
        self.manifest = Manifest.read(self.folder, verify=verify)
        self.providers = choose_providers(providers)
        self.session = self._session(threads)
        self._check_io()
        self.tokenizer = self._tokenizer()
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._cache: KVCache | None = None
        self._binding = self.session.io_binding()
        # generate and step share the cache buffers and the IO binding: one call at a time, so that
        # calls from several threads are serialised instead of writing into each other's cache
        self._lock = threading.RLock()
        self._bound_cache: KVCache | None = None
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        self._logits_dtype = np.float16 if logits_type == ORT_TYPES["float16"] else np.float32
        logger.info("%s: %s model, %d cache tensors (%s update), %s", self.folder, self.manifest.kind,
                    len(self.manifest.cache), self.manifest.cache_update, self.session.get_providers()[0])

    def __repr__(self) -> str:
        m = self.manifest
        return (f"OnnxEngine({str(self.folder)!r}, kind={m.kind}, {len(m.cache)} cache tensors, "
                f"{m.kv_cache_bytes_per_token()} KV bytes/token, providers={self.session.get_providers()})")

    # -- loading --------------------------------------------------------------------------------
    def _session(self, threads) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3          # errors only: ORT's warnings are not the user's problem
        # a memory pattern is planned and kept for every new set of input shapes, and a decode step's
        # attention_mask is one token longer each time: ~3.3 KB more per generated token, never freed
        # (benchmarks/results/soak). Without it a step costs 0-5% more (SmolLM2 d_kv=8, past 512-4096).
        options.enable_mem_pattern = False
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        path = self.folder / self.manifest.model_file
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineError(
                f"onnxruntime {ort.__version__} could not load {path}: {str(e).strip()}\n"
                "If it names an operator or opset it does not know, this onnxruntime is older than the exporter "
                "expected: upgrade onnxruntime (or export with a lower opset). Otherwise the model file is damaged "
                "or not an ONNX model: export the folder again.") from e

    def _check_io(self) -> None:
        """The program's declared inputs/outputs against the manifest: names, dtypes, ranks, fixed sizes."""
        m = self.manifest
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        want_in = [("input_ids", ("int64",), ["batch", "seq"]), ("attention_mask", ("int64",), ["batch", "total"]),
                   ("position_ids", ("int64",), ["batch", "seq"])] + [(e.input, (e.dtype,), e.shape) for e in m.cache]
        want_out = [("logits", ("float32", "float16"), ["batch", "seq", m.vocab_size])] + \
                   [(e.output, (e.dtype,), e.shape) for e in m.cache]
        problems = []
        for kind, have, want in (("input", inputs, want_in), ("output", outputs, want_out)):
            for name, dtypes, shape in want:
                if name not in have:
                    problems.append(f"{kind} {name} is in the manifest but not in the model")
                    continue
                problems += _compare(f"{kind} {name}", have[name], dtypes, shape)
        extra = sorted(set(inputs) - {w[0] for w in want_in})
        if extra:
            problems.append(f"the model has inputs the manifest does not name: {extra}")
        if problems:
            raise EngineError(f"{self.folder / m.model_file} does not match its manifest:\n  " + "\n  ".join(problems) +
                              "\nThe model and manifest must come from one export: export the folder again.")

    def _tokenizer(self):
        name = self.manifest.tokenizer_file
        if not name:
            return None
        from tokenizers import Tokenizer
        try:
            return Tokenizer.from_file(str(self.folder / name))
        except Exception as e:
            raise ManifestError(f"{self.folder / name} could not be read by tokenizers ({e}): export the folder again") from e

    # -- one step -------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """Empty preallocated cache buffers for ``batch`` rows and up to ``capacity`` tokens."""
        return KVCache(self.manifest.cache, batch, capacity, self.manifest.cache_update, self.device)

    def step(self, input_ids, attention_mask, position_ids=None, cache=None) -> StepOutput:
        """One call of the program.

        Args:
            input_ids: [B, S] new tokens. attention_mask: [B, T+S], 1 = real token.
            position_ids: [B, S]; default ``positions(attention_mask)[:, -S:]``.
            cache: None (T = 0), the T-token past as numpy arrays (a list in manifest order or a
                dict by input name; checked: shape and dtype per entry), or a ``KVCache``
                holding T tokens, which is advanced in place through IO binding.
        Returns logits [B, S, V] and the present (numpy, T+S tokens) or the same ``KVCache``.
        """
        ids = self._ints("input_ids", input_ids)
        mask = self._ints("attention_mask", attention_mask)
        batch, new = ids.shape
        if new < 1:
            raise ValueError("input_ids has no tokens: a step needs at least one new token")
        if mask.shape[0] != batch or mask.shape[1] < new:
            raise ValueError(f"attention_mask must be [batch, past + new] with batch {batch} and at least {new} "
                             f"columns, got shape {mask.shape}")
        past = mask.shape[1] - new
        pos = positions(mask)[:, -new:] if position_ids is None else self._ints("position_ids", position_ids)
        if pos.shape != ids.shape:
            raise ValueError(f"position_ids must have the shape of input_ids {ids.shape}, got {pos.shape}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.manifest.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.manifest.vocab_size}), got min {ids.min()} max {ids.max()}")
        if isinstance(cache, KVCache):
            with self._lock:                    # the IO binding is the engine's one
                return StepOutput(self._bound_step(ids, mask, pos, cache), cache)
        entries = self.manifest.cache
        if cache is None:
            if past:
                raise CacheError(f"attention_mask covers {past} past tokens but no cache was given")
            cache = [np.zeros(e.concrete_shape(batch, 0), NUMPY_DTYPES[e.dtype]) for e in entries]
        cache = check_cache(entries, cache, batch, past)
        if self.manifest.cache_update == "in_place":   # the program writes the new tokens at index T
            cache = [_grow(a, e.time_axis, new) for e, a in zip(entries, cache)]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feeds.update({e.input: a for e, a in zip(entries, cache)})
        out = self.session.run(["logits"] + [e.output for e in entries], feeds)
        return StepOutput(out[0], out[1:])

    def prefill(self, input_ids, attention_mask, cache: KVCache, chunk: int | None = None) -> np.ndarray:
        """Feed new tokens [B, S] into ``cache`` (which holds the T tokens ``attention_mask`` [B, T+S]
        covers before them) ``chunk`` tokens per step (default: the engine's ``prefill_chunk``);
        returns the logits of the last position [B, V], those of one step over all S tokens."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"prefill writes into a KVCache (engine.new_cache), got {type(cache).__name__}")
        chunk = self.prefill_chunk if chunk is None else _check_chunk(chunk)
        ids, mask = self._ints("input_ids", input_ids), self._ints("attention_mask", attention_mask)
        new, past = ids.shape[1], mask.shape[1] - ids.shape[1]
        pos = positions(mask)[:, past:]
        step = new if chunk is None else chunk
        with self._lock:                        # one prompt's chunks are not interleaved with another call
            for start in range(0, new, step):
                end = min(start + step, new)
                logits = self.step(ids[:, start:end], mask[:, :past + end], pos[:, start:end], cache).logits
        return logits[:, -1]

    def _bound_step(self, ids, mask, pos, cache: KVCache) -> np.ndarray:
        batch, new = ids.shape
        if cache.batch != batch:
            raise CacheError(f"the KVCache holds {cache.batch} rows but input_ids has {batch}")
        if cache is not self._bound_cache and cache.entries != self.manifest.cache:
            raise CacheError("this KVCache was made for another engine's cache entries: use engine.new_cache()")
        if cache.length != mask.shape[1] - new:
            raise CacheError(f"attention_mask covers {mask.shape[1] - new} past tokens but the KVCache holds {cache.length}")
        b = self._binding
        b.bind_cpu_input("input_ids", ids)           # binding a name again replaces it
        b.bind_cpu_input("attention_mask", mask)
        b.bind_cpu_input("position_ids", pos)
        logits = np.empty((batch, new, self.manifest.vocab_size), self._logits_dtype)
        b.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        # ~6 µs per binding call: an in-place cache keeps its bindings from step to step, a
        # concatenating one moves to the other ping-pong buffer and a longer shape every step
        if cache.update != "in_place" or self._bound_cache is not cache:
            cache.bind(b, new)
            self._bound_cache = cache
        elif cache.length + new > cache.capacity:
            cache.bind(b, new)                        # raises the capacity error
        self.session.run_with_iobinding(b)
        cache.advance(new)
        return logits

    @staticmethod
    def _ints(name: str, x) -> np.ndarray:
        a = np.asarray(x)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be a 2-d integer array [batch, length], got shape {a.shape} dtype {a.dtype}")
        return np.ascontiguousarray(a, dtype=np.int64)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, stop=None, on_token: Callable[[int, int, str], None] | None = None,
                 seed: int | None = None) -> GenerationResult:
        """Generate for one prompt or a batch. Safe to call from several threads: generations on
        one engine run one after another (each thread gets what it would get alone); for parallel
        generations, give each thread its own engine.

        Args:
            prompts: a string, a list of strings, a list of token ids, or a list of such lists.
            max_new_tokens: at most this many tokens per prompt; prompt + max_new_tokens must fit
                ``manifest.max_length``.
            temperature, top_k, top_p: sampling (``sampling.py``); temperature 0 is greedy.
            stop: a string or token id, or a list of them; a row ends at the first one it
                produces (a stop string is cut from the text; a stop id stays in ``token_ids``).
            on_token: called as ``on_token(row, token_id, text_piece)`` for every generated
                token as it comes; pieces concatenate to the row's text (a multi-byte character
                split over tokens arrives with its last token).
            seed: seeds the sampler (deterministic); unused when greedy.
        """
        with self._lock:
            return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, stop, on_token, seed)

    def _generate(self, prompts, max_new_tokens, temperature, top_k, top_p, stop, on_token, seed) -> GenerationResult:
        config = SamplingConfig(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        rows = self._prompt_ids(prompts)
        stop_ids, stop_strings = self._stops(stop)
        eos = set(self.manifest.eos_token_ids)
        limit = self.manifest.max_length
        for i, r in enumerate(rows):
            if len(r) > limit:
                raise ValueError(f"prompt {i} has {len(r)} tokens, more than this engine's maximum length {limit}: "
                                 "shorten it")
            if len(r) + max_new_tokens > limit:
                raise ValueError(f"prompt {i} has {len(r)} tokens and max_new_tokens is {max_new_tokens}: together "
                                 f"{len(r) + max_new_tokens} exceed this engine's maximum length {limit}; lower "
                                 f"max_new_tokens to at most {limit - len(r)} or shorten the prompt")
        result = GenerationResult([Completion(list(r)) for r in rows])
        if max_new_tokens == 0:
            return result
        batch, width, pad = len(rows), max(len(r) for r in rows), self._pad_id()
        ids = np.full((batch, width), pad, np.int64)
        mask = np.zeros((batch, width), np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        pos = positions(mask)
        cache = self._cache_for(batch, width + max_new_tokens)
        decoders = [IncrementalDecoder(self.tokenizer) if self.tokenizer else None for _ in rows]
        stopped_by_string = [False] * batch
        streamed = [0] * batch                        # characters of each row's text sent to on_token
        rng = np.random.default_rng(seed)
        done = np.zeros(batch, dtype=bool)

        t0 = time.perf_counter()
        logits = self.prefill(ids, mask, cache)
        result.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for n in range(max_new_tokens):
            if not np.isfinite(logits).all():
                raise EngineError(f"the model produced NaN or inf logits at generated token {n} (its weights or "
                                  "the cache hold non-finite values)")
            nxt = sample(logits.astype(np.float32, copy=False), config, rng)
            for i in np.flatnonzero(~done):
                c, tok, dec = result.completions[i], int(nxt[i]), decoders[i]
                c.token_ids.append(tok)
                new_text = dec.push(tok) if dec else ""
                if tok in eos or tok in stop_ids:
                    done[i], c.finish_reason = True, "eos" if tok in eos else "stop"
                end = None                             # how far the row's text may be streamed
                if dec is not None:
                    at = find_stop(dec.text, stop_strings, len(new_text)) if stop_strings and new_text else -1
                    if at >= 0:
                        done[i], c.finish_reason, stopped_by_string[i] = True, "stop", True
                        c.text = end = dec.text[:at]
                    elif done[i] or n + 1 == max_new_tokens:
                        dec.flush()                    # the row's last token: nothing more will complete it
                        end = dec.text
                    else:                              # hold back what may start a stop string
                        end = dec.text[:len(dec.text) - held_back(dec.text, stop_strings)]
                piece = "" if end is None else end[streamed[i]:]
                streamed[i] = max(streamed[i], len(end or ""))
                if on_token is not None:
                    on_token(int(i), tok, piece)
            if done.all() or n + 1 == max_new_tokens:
                break
            nxt = np.where(done, pad, nxt)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            logits = self.step(nxt[:, None], mask, pos, cache).logits[:, -1]
            result.decode_steps += 1
        result.decode_seconds = time.perf_counter() - t0
        if self.tokenizer is not None:
            for c, by_string in zip(result.completions, stopped_by_string):
                if not by_string:
                    c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        return result

    def _cache_for(self, batch: int, capacity: int) -> KVCache:
        """The engine's cache buffers, reused across calls while they are large enough."""
        c = self._cache
        if c is None or c.batch != batch or c.capacity < capacity:
            self._cache = c = self.new_cache(batch, capacity)
        c.reset()
        return c

    def _prompt_ids(self, prompts) -> list[list[int]]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts and all(_is_int(t) for t in prompts):
            prompts = [list(prompts)]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a string, a list of strings, a list of token ids or a list of "
                             f"token-id lists, got {prompts!r:.80}")
        rows = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"{self.folder} has no tokenizer: give prompts as token ids")
                ids = self.tokenizer.encode(p).ids
            elif isinstance(p, (list, tuple, np.ndarray)) and all(_is_int(t) for t in p):
                ids = [int(t) for t in p]
            else:
                raise ValueError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
            if not ids:
                raise ValueError(f"prompt {i} is empty (no tokens): give at least one token")
            bad = [t for t in ids if not 0 <= t < self.manifest.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.manifest.vocab_size}): {bad[:5]}")
            rows.append(ids)
        return rows

    def _stops(self, stop) -> tuple[set[int], list[str]]:
        if stop is None:
            return set(), []
        items = [stop] if isinstance(stop, (str, int)) else list(stop)
        ids = {int(s) for s in items if _is_int(s)}
        strings = [s for s in items if isinstance(s, str)]
        if len(ids) + len(strings) != len(items) or any(not s for s in strings):
            raise ValueError(f"stop must be non-empty strings and/or token ids, got {stop!r}")
        if strings and self.tokenizer is None:
            raise ValueError(f"{self.folder} has no tokenizer, so stop strings cannot be matched: give stop token ids")
        return ids, strings

    def _pad_id(self) -> int:
        m = self.manifest
        return m.pad_token_id if m.pad_token_id is not None else (m.eos_token_ids[0] if m.eos_token_ids else 0)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _grow(a: np.ndarray, axis: int, extra: int) -> np.ndarray:
    """``a`` with ``extra`` zero slots appended on ``axis`` (room for an in-place update)."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, extra)
    return np.pad(a, pad)


def _compare(what: str, node, dtypes: tuple[str, ...], shape: list) -> list[str]:
    problems = []
    if node.type not in {ORT_TYPES[d] for d in dtypes}:
        problems.append(f"{what} has type {node.type}, the manifest says {' or '.join(dtypes)}")
    if len(node.shape) != len(shape):
        return problems + [f"{what} has rank {len(node.shape)} {node.shape}, the manifest says {shape}"]
    for axis, (have, want) in enumerate(zip(node.shape, shape)):
        if isinstance(have, int) and isinstance(want, int) and have != want:
            problems.append(f"{what} has size {have} on axis {axis}, the manifest says {want}")
        elif isinstance(have, int) and isinstance(want, str):
            problems.append(f"{what} is fixed to {have} on axis {axis}, the manifest says it is dynamic ({want!r})")
    return problems
