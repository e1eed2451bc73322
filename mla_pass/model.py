"""The converted model: forward, greedy generation over the latent cache, save/load."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from .config import MLAConfig
from .frontend.sites import SiteReport, kv_bytes_per_token
from .modules.modes import FORMS
from .modules.site_plan import SitePlan
from .rewrite import CacheTensor

logger = logging.getLogger(__name__)



class MLAModel(nn.Module):
    """A decoder whose attention runs as latent attention. Call it like the original:
    ``logits = mla(input_ids)``; decode with ``mla.generate(...)``."""

    def __init__(self, program: fx.GraphModule, step_graph: fx.Graph, cache: list[CacheTensor],
                 plans: dict[int, SitePlan], report: list[SiteReport], config: MLAConfig,
                 takes_positions: bool, vocab_size: int, source: dict, generation: dict | None = None):
        super().__init__()
        self.program = program
        self._step_graph = step_graph
        self._step: fx.GraphModule | None = None
        self.cache_spec = cache
        self.plans = plans
        self.report = report
        self.config = config
        self.takes_positions = takes_positions
        self.vocab_size = vocab_size
        self.source = source
        self.generation = generation or {}      # eos/pad token ids of the source model

    # -- running --------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        p = next(self.program.parameters(), None)
        if p is not None and p.is_floating_point():
            moved = fn(torch.zeros((), dtype=p.dtype, device=p.device))
            if moved.dtype != p.dtype:
                # the captured program holds the capture dtype's casts (e.g. RMSNorm's .to(input_dtype)),
                # so cast weights would meet activations of the old dtype
                raise TypeError(f"this model was converted in {p.dtype} and its program keeps that dtype's casts; "
                                f"it cannot be cast to {moved.dtype}. Convert the source model in {moved.dtype} "
                                f"instead (model.to({moved.dtype}) before mla_pass.convert).")
            if not same_device(moved.device, p.device):
                # the capture device is baked into ops such as HF's inv_freq.to(x.device) or arange(device=)
                for graph in (self.program.graph, self._step_graph):
                    retarget_device(graph, p.device, moved.device)
                self.program.recompile()
        self._step = None          # buffers may be replaced: rebuild the step program lazily
        return super()._apply(fn, recurse)

    @property
    def step(self) -> fx.GraphModule:
        """The decode-step program: (input_ids, [position_ids,] attention_mask, *past) → (logits, *present)."""
        if self._step is None:
            self._step = fx.GraphModule(self.program, self._step_graph)
        return self._step

    def set_form(self, form: str) -> None:
        """"auto" (decompressed for prompts, absorbed for one-token steps), "absorbed" or "decompressed"."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        from .modules.latent_attention import LatentAttention
        for m in self.program.modules():
            if isinstance(m, LatentAttention):
                m.form = form

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        input_ids = self._check_ids(input_ids)
        if attention_mask is not None and not self.can_cache:
            if not bool(attention_mask.bool().all()):
                raise NotImplementedError("padding masks need the cached program, which this model cannot use "
                                          "(no position_ids input, or sites left untouched)")
            attention_mask = None
        if attention_mask is None:
            if position_ids is None:
                position_ids = self._positions(torch.ones_like(input_ids))
            args = (input_ids, position_ids) if self.takes_positions else (input_ids,)
            return self.program(*args)
        logits, *_ = self.step_with_cache(input_ids, attention_mask, self.empty_cache(input_ids.shape[0]), position_ids)
        return logits

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        p = next(self.program.parameters())
        return [torch.zeros(self.plans[t.site].cache_shape(t.kind, batch, 0), dtype=p.dtype, device=p.device)
                for t in self.cache_spec]

    @property
    def untouched_sites(self) -> list[SiteReport]:
        return [r for r in self.report if r.converted_values_per_token is None]

    @property
    def can_cache(self) -> bool:
        """Cached decoding needs positions as an input and every site converted."""
        return self.takes_positions and not self.untouched_sites

    def step_with_cache(self, input_ids, attention_mask, past: list[torch.Tensor], position_ids=None):
        """One call of the decode-step program; ``attention_mask`` covers past and new tokens."""
        if not self.takes_positions:
            raise NotImplementedError("this model's forward takes no position_ids, so it cannot decode from a "
                                      "cache; generate() recomputes the whole sequence instead")
        if self.untouched_sites:
            raise NotImplementedError(f"{len(self.untouched_sites)} attention site(s) were left untouched "
                                      "(best_effort), and they keep no cache: generate() recomputes the whole "
                                      "sequence instead")
        if len(past) != len(self.cache_spec):
            raise ValueError(f"expected {len(self.cache_spec)} cache tensors, got {len(past)}")
        batch, new = input_ids.shape
        past_len = past[0].shape[1] if past else 0
        dtype = next(self.program.parameters()).dtype
        for spec, t in zip(self.cache_spec, past):
            want = self.plans[spec.site].cache_shape(spec.kind, batch, past_len)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"cache tensor {spec.name} has shape {got}, expected {want} "
                                 f"(batch {batch}, {past_len} cached tokens)")
            if t.dtype != dtype:
                raise ValueError(f"cache tensor {spec.name} has dtype {t.dtype}, expected {dtype}")
        if attention_mask.shape != (batch, past_len + new):
            raise ValueError(f"attention_mask must be [batch, past + new] = {(batch, past_len + new)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = self._positions(attention_mask)[:, -new:]
        return self.step(input_ids, position_ids, attention_mask, *past)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | list[int] | None = "default", pad_token_id: int | None = None,
                 static_cache: bool | None = None, compile: bool | str = False) -> torch.Tensor:
        """Greedy decoding over the latent cache → [B, S + n] with n ≤ ``max_new_tokens``.

        Like Hugging Face ``generate(do_sample=False)``: stops when every row has produced an
        end token (default: the source model's ``eos_token_id``; ``None`` never stops early),
        finished rows are filled with ``pad_token_id`` (default: the first end token). Batches
        of different lengths are left-padded with ``attention_mask`` marking real tokens.

        ``static_cache`` (default: on CUDA): decode over buffers allocated once for prompt +
        ``max_new_tokens`` and written in place (``mla_pass.decode.StaticCacheDecoder``), the same
        tokens as the growing cache; ``compile=True`` (static cache only) captures the decode step
        with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on CUDA), ``compile="cudagraphs"``
        replays the eager kernels as a CUDA graph (seconds to compile; ``decode.COMPILES``).
        """
        input_ids = self._check_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        def valid(i) -> bool:
            return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size

        # the caller's ids are checked; the model's own defaults may name ids it can never produce
        # (a tiny test config keeps GPT-2's eos 50256): those are dropped
        given = {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        for what, ids in given.items():
            ids = [] if ids is None or ids == "default" else ([ids] if isinstance(ids, int) else ids)
            if not isinstance(ids, (list, tuple)) or not all(valid(i) for i in ids):
                raise ValueError(f"{what} must be token ids in [0, {self.vocab_size}), got {given[what]!r}")
        stop = self.generation.get("eos_token_id") if eos_token_id == "default" else eos_token_id
        stop = [] if stop is None else ([stop] if isinstance(stop, int) else list(stop))
        stop = [i for i in stop if valid(i)]
        if pad_token_id is None:
            pad_token_id = self.generation.get("pad_token_id") if eos_token_id == "default" else None
            pad_token_id = pad_token_id if valid(pad_token_id) else (stop[0] if stop else 0)
        stop_t = torch.tensor(stop, dtype=torch.long, device=input_ids.device)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
                raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, "
                                 f"got {got}")
            zero_one = bool(((attention_mask == 0) | (attention_mask == 1)).all())
            if not zero_one or not bool(attention_mask.bool().any(-1).all()):
                raise ValueError("attention_mask must hold 0/1 with at least one real token (1) in every row")
        if static_cache is None:
            static_cache = input_ids.device.type == "cuda" and self.can_cache
        from .decode import COMPILES, StaticCacheDecoder
        if not isinstance(static_cache, bool) or not (isinstance(compile, bool) or compile in COMPILES):
            raise ValueError(f"static_cache must be True or False and compile True, False or one of "
                             f"{sorted(COMPILES)}, got {static_cache!r}, {compile!r}")
        if static_cache and not self.can_cache:
            raise ValueError("static_cache=True needs the cached program, which this model cannot use (no "
                             "position_ids input, or sites left untouched)")
        if compile and not static_cache:
            raise ValueError("compile=True compiles the static-cache decode step: pass static_cache=True too")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device).long()
        tokens = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if max_new_tokens == 0:
            return tokens
        decoder = None
        if static_cache:
            decoder = StaticCacheDecoder(self.step, self.cache_spec, self.plans, input_ids.shape[0],
                                         input_ids.shape[1] + max_new_tokens,
                                         compile="reduce-overhead" if compile is True else compile or None)
            logits = decoder(input_ids, mask)
        elif self.can_cache:
            logits, *cache = self.step_with_cache(input_ids, mask, self.empty_cache(input_ids.shape[0]))
        else:
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise NotImplementedError("padded batches need the cached program, which this model cannot use "
                                          "(no position_ids input, or sites left untouched)")
            logger.warning("generating without a cache (no position_ids input, or sites left untouched): "
                           "every step recomputes the whole sequence")
            logits = self.forward(tokens)
        for i in range(max_new_tokens):
            if not bool(torch.isfinite(logits[:, -1]).all()):
                raise FloatingPointError(f"the model produced NaN or inf logits at generated token {i} (its weights "
                                         "or the cache hold non-finite values): greedy decoding would emit token 0 "
                                         "forever")
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            done |= torch.isin(nxt, stop_t)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if i + 1 == max_new_tokens or bool(done.all()):
                break
            if decoder is not None:
                logits = decoder(nxt[:, None], mask)
            elif self.can_cache:
                logits, *cache = self.step_with_cache(nxt[:, None], mask, cache)
            else:
                logits = self.forward(tokens)
        return tokens

    def _check_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer tensor [batch, seq]")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} is empty: give at least one row of at least one "
                             "token")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        return input_ids.long()

    @staticmethod
    def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    # -- accounting -----------------------------------------------------------------------------
    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes cached per token across all layers (untouched sites count their full K/V)."""
        return kv_bytes_per_token(self.report, dtype)

    def original_kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.float16) -> int:
        return kv_bytes_per_token(self.report, dtype, original=True)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` (all weights) and ``mla_config.json`` (config, per-site
        plans, how to rebuild the source model, a checksum of the weights) into a folder."""
        from .persist import save_model
        return save_model(self, Path(path))


def same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def retarget_device(graph: fx.Graph, old: torch.device, new: torch.device) -> None:
    """Every device constant of ``graph`` equal to ``old`` becomes ``new`` (in place)."""
    swap = lambda a: new if isinstance(a, torch.device) and same_device(a, old) else a  # noqa: E731
    for node in graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)


def require_converted(model, verb: str) -> None:
    """``verb`` (e.g. "recover") works on converted models only: a clear error otherwise."""
    if not isinstance(model, MLAModel):
        raise TypeError(f"{verb} needs a converted model (an MLAModel from mla_pass.convert or mla_pass.load), got "
                        f"{type(model).__name__}: convert the model first")
