"""Second recovery stage: end-to-end training of a converted model on text, on one or many processes.

Two objectives share one loop, so they are compared on the same tokens, start and schedule:
"kl" (distillation, the default): per position τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), t the
original's (teacher's) logits, computed on the fly per batch under ``no_grad`` (no logit cache:
49k-vocabulary logits are big), s the converted model's; "ce": next-token cross-entropy on the
text itself, no teacher — MHA2MLA's own fine-tune (``DistillConfig.mha2mla()``). Which weights
move is a choice (``DistillConfig.train``): by default only the latent attention modules' (down,
up-projections, rope-key rows, biases), which keeps the optimiser state small and leaves the rest
of the model exactly the original's.

Optimiser: AdamW with a linear warm-up, then a cosine decay or MHA2MLA's constant phase and 1-sqrt
decay, gradient clipping. Batch order is a pure function of (seed, step), and a checkpoint holds
the trained weights, the AdamW moments and the step, so a run stopped by a time limit and resumed
gives bit-for-bit the weights of an uninterrupted run (same machine, same thread count), and a
run on N processes (``distributed``) resumes on any other number. Checkpoints are
``distill.safetensors`` + ``distill.json`` in a folder, written atomically by rank 0.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..model import MLAModel, require_converted
from ..modules.latent_attention import LatentAttention
from ..persist import finish_pair
from . import distributed
from .distributed import World
from .precision import AUTOCAST_CHOICES, resolve_autocast
from .training_state import (CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, State, load_tensors, read_state, save_checkpoint,
                             tokens_key)

logger = logging.getLogger(__name__)

TRAIN_SETS = ("latent", "latent+norms", "all")
OBJECTIVES = ("kl", "ce")
DECAYS = ("cosine", "1-sqrt")


@dataclass(frozen=True)
class DistillConfig:
    """Args:
        steps: optimiser steps; ``None``: as many as fit in the time budget (``distill(max_seconds=...)``),
            estimated from the warm-up steps' speed and then fixed (and checkpointed).
        lr: peak learning rate of the latent attention weights (1e-3 beat 3e-3 on SmolLM2-135M).
        other_lr: peak learning rate of the other trained weights (``train`` "latent+norms" / "all").
        batch_size: sequences per step, over all processes together (a multiple of their number).
        objective: "kl" (distil the original's next-token distributions) or "ce" (next-token
            cross-entropy on the text: the MHA2MLA fine-tune; needs no teacher).
        temperature: τ of the distillation loss (1 = plain KL; "kl" only).
        train: "latent" (the converted attention modules), "latent+norms" (also every 1-d
            weight: norms, biases) or "all" (every weight, embeddings included).
        warmup_steps: linear warm-up from the first step.
        decay: "cosine" (from the end of the warm-up to ``min_lr_ratio``) or "1-sqrt" (constant,
            then 1 − √progress down to ``min_lr_ratio`` over the last ``decay_fraction`` of the steps).
        decay_fraction: the share of the steps the "1-sqrt" decay takes.
        min_lr_ratio: the floor of the decay, as a share of the peak.
        weight_decay: AdamW's (0 by default: decay would pull the SVD start towards zero).
        adam_betas: AdamW's (β1, β2).
        grad_clip: max global gradient norm (``None``: no clipping).
        seed: batch order.
        autocast: the forward passes' ``torch.autocast`` dtype, weights and optimiser state staying
            float32: "auto" (what this device runs fastest, ``precision.resolve_autocast``: bf16 on
            CUDA and on CPUs with bf16 instructions where it measures faster, else float32),
            "bfloat16", "float16" or ``None`` (float32).
    """
    steps: int | None = 200
    lr: float = 1e-3
    other_lr: float = 3e-5
    batch_size: int = 2
    objective: str = "kl"
    temperature: float = 1.0
    train: str = "latent"
    warmup_steps: int = 10
    decay: str = "cosine"
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    seed: int = 0
    autocast: str | None = "auto"

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None for a time budget), got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and self.other_lr >= 0):
            raise ValueError(f"lr must be > 0 and other_lr >= 0, got lr={self.lr}, other_lr={self.other_lr}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.train not in TRAIN_SETS:
            raise ValueError(f"train must be one of {TRAIN_SETS}, got {self.train!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise ValueError("warmup_steps >= 0, 0 <= min_lr_ratio <= 1 and weight_decay >= 0 are required")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")

    @classmethod
    def mha2mla(cls, steps: int | None = 200, batch_size: int = 2, **overrides) -> DistillConfig:
        """The MHA2MLA paper's fine-tune, from its SmolLM-135M training config: next-token
        cross-entropy on the text, every weight trained, AdamW lr 1e-4 with betas (0.9, 0.95) and
        no weight decay, gradient norm clipped at 1, linear warm-up over the first 10% of the steps,
        constant, then a 1-sqrt decay to 0 over the last 1/6 (their 10,000 + 2,000 of 12,000).
        Their batch (256 × 2048 tokens on 4 GPUs) and bf16 are the hardware's: pass your own."""
        warmup = max(1, round(0.1 * steps)) if steps is not None else 10
        recipe = dict(steps=steps, batch_size=batch_size, objective="ce", train="all", lr=1e-4, other_lr=1e-4,
                      warmup_steps=warmup, decay="1-sqrt", decay_fraction=1 / 6, min_lr_ratio=0.0,
                      weight_decay=0.0, adam_betas=(0.9, 0.95), grad_clip=1.0)
        return cls(**{**recipe, **overrides})

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        floor = self.min_lr_ratio
        if self.decay == "1-sqrt":
            length = max(1, round(self.decay_fraction * total))
            progress = min(1.0, max(0.0, (step - (total - length)) / length))
            return floor + (1 - floor) * (1 - math.sqrt(progress))
        span = max(total - self.warmup_steps, 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class DistillReport:
    steps: int                   # steps done in total (this call and any resumed before)
    total_steps: int             # the schedule's length
    losses: list[float] = field(default_factory=list)     # training loss per step (all calls), mean over ranks
    seconds: float = 0.0         # wall time (all calls)
    cpu_seconds: float = 0.0     # this process's CPU time (all calls)
    tokens: int = 0              # training tokens seen, all ranks together (all calls)
    autocast: str | None = None  # the autocast dtype that ran (None: float32)
    processes: int = 1           # the world size of this call

    @property
    def complete(self) -> bool:
        return self.steps >= self.total_steps

    def mean_loss(self, last: int = 20) -> float:
        tail = self.losses[-last:]
        return sum(tail) / max(len(tail), 1)


def trainable_parameters(mla: MLAModel, train: str) -> dict[str, torch.nn.Parameter]:
    """Name → parameter of ``mla.program`` that ``train`` selects (latent modules first)."""
    latent = {id(p) for m in mla.program.modules() if isinstance(m, LatentAttention) for p in m.parameters()}
    chosen = {}
    for name, p in mla.program.named_parameters():
        if id(p) in latent or train == "all" or (train == "latent+norms" and p.dim() == 1):
            chosen[name] = p
    return chosen


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)), in float32."""
    t = (teacher_logits.float() / temperature).log_softmax(-1)
    s = (student_logits.float() / temperature).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` [B, L, V] on ``tokens`` [B, L], in float32."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())


def distill(mla: MLAModel, original: torch.nn.Module | None, tokens, config: DistillConfig | None = None, *,
            max_seconds: float | None = None, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int = 25, progress: bool = True, clock: str = "wall", parallel: str = "ddp",
            on_step: Callable[[int, float], None] | None = None) -> DistillReport:
    """Train ``mla`` (in place) towards ``original``'s next-token distributions on ``tokens``
    (or, with ``config.objective="ce"``, to predict ``tokens`` themselves).

    Inside a ``torch.distributed`` process group (``torchrun``, ``mla-pass recover --nproc``) the
    run is data-parallel: each rank trains on its share of every global batch (``distributed``).

    Args:
        mla: a converted model (``mla_pass.convert`` / ``mla_pass.load``).
        original: the model it was converted from (the teacher; not modified); ``None`` only with
            the "ce" objective.
        tokens: training token ids ``[N, L]`` (e.g. 512-token windows of text that is not the
            evaluation text; ``quality.windows.training_windows``), the same on every rank.
        config: a ``DistillConfig``.
        max_seconds: a step that would end past this many seconds of ``clock`` is not started
            (resume from ``checkpoint``); at least one step runs per call. With
            ``config.steps=None`` it also sets the schedule's length.
        checkpoint: a folder; if it holds a checkpoint of the same config and tokens, training
            continues from it; one is written every ``checkpoint_every`` steps and at the end.
        progress: a progress bar (rank 0).
        clock: what ``max_seconds`` measures: "wall" time, or this process's "cpu" time (not
            counting time the process is paused or waits for a shared CPU; with T threads it
            runs up to T× faster than wall time).
        parallel: with several processes, "ddp" (every rank holds the model) or "fsdp" (FSDP2:
            parameters, gradients and moments sharded over the ranks).
        on_step: called on every rank after each step with (steps done, the step's loss).

    Example:
        >>> report = distill(mla, model, training_windows(tok, 64, 512), DistillConfig(steps=100))  # doctest: +SKIP
        >>> report.mean_loss()                                                                        # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .evaluate import logits_of

    config = config or DistillConfig()
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    require_converted(mla, "distill")
    if isinstance(original, MLAModel):
        raise TypeError("the teacher must be the original (unconverted) model, not a converted one")
    if original is None and config.objective == "kl":
        raise TypeError("the 'kl' objective distils the original model: pass it (or use objective='ce')")
    if config.steps is None and max_seconds is None:
        raise ValueError("DistillConfig(steps=None) trains for a time budget: pass max_seconds")
    tokens = _check_tokens(tokens, mla.vocab_size)
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    world = World.current()
    if config.batch_size % world.size:
        raise ValueError(f"batch_size {config.batch_size} does not split over {world.size} processes: "
                         f"make it a multiple of {world.size}")
    chosen = set(trainable_parameters(mla, config.train))
    if not chosen:
        raise ValueError("the model has no latent attention weights to train: was it converted?")

    device = next(mla.program.parameters()).device
    state = State(config=json.loads(json.dumps(asdict(config))), tokens_key=tokens_key(tokens), step=0,
                   total_steps=config.steps, losses=[], seconds=0.0, cpu_seconds=0.0, tokens=0)
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None and world.main:
        finish_pair(folder / CHECKPOINT_WEIGHTS, folder / CHECKPOINT_STATE)     # a checkpoint write cut short
    distributed.barrier(world)
    resuming = folder is not None and (folder / CHECKPOINT_STATE).is_file()
    if resuming:
        state = read_state(folder, state)
    if state.autocast is None:                        # a resumed run keeps the dtype it started with
        dtype, why = resolve_autocast(config.autocast, device)
        state.autocast, why = distributed.from_main((dtype or "float32", why), world)
        if world.main:
            (logger.info if not progress else print)(f"distillation autocast: {state.autocast} ({why})")
    autocast = None if state.autocast == "float32" else state.autocast

    forms = _set_form(mla, "decompressed")            # training uses the prompt form; restored below
    requires = {n: p.requires_grad for n, p in mla.program.named_parameters()}
    latent_ids = {id(p) for m in mla.program.modules() if isinstance(m, LatentAttention) for p in m.parameters()}
    latent_names = {n for n, p in mla.program.named_parameters() if id(p) in latent_ids}
    for name, p in mla.program.named_parameters():
        p.requires_grad_(name in chosen)
    teacher_device = next(iter(original.parameters())).device if original is not None else device
    positions = torch.arange(tokens.shape[1], device=device)[None]
    bar = tqdm(total=state.total_steps, initial=state.step, desc="distilling", disable=not (progress and world.main))
    now = time.perf_counter if clock == "wall" else time.process_time
    wall0, cpu0, budget0 = time.perf_counter(), time.process_time(), now()
    seconds0, cpu_seconds0 = state.seconds, state.cpu_seconds
    durations: list[float] = []
    try:
        with distributed.parallel_module(mla.program, world, parallel) as student_program:
            params = {n: p for n, p in mla.program.named_parameters() if n in chosen}    # DTensors under FSDP
            groups = [{"params": [p for n, p in params.items() if n in latent_names], "lr": config.lr},
                      {"params": [p for n, p in params.items() if n not in latent_names], "lr": config.other_lr}]
            opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.adam_betas),
                                    weight_decay=config.weight_decay)
            peaks = [g["lr"] for g in opt.param_groups]
            if resuming:
                load_tensors(folder, params, opt)
            while state.total_steps is None or state.step < state.total_steps:
                step_start = now()
                batch = tokens[distributed.shard(_batch_indices(config.seed, state.step, config.batch_size,
                                                                tokens.shape[0]), world)]
                inputs = (batch.to(device),) + ((positions.expand(len(batch), -1),) if mla.takes_positions else ())
                with _autocast(device, autocast):
                    student = student_program(*inputs)
                student = student[0] if isinstance(student, (tuple, list)) else student
                if config.objective == "ce":
                    loss = next_token_loss(student, inputs[0])
                else:
                    with torch.no_grad(), _autocast(teacher_device, autocast):
                        teacher = logits_of(original, batch.to(teacher_device)).to(device)
                    loss = distillation_loss(student, teacher, config.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()                               # DDP / FSDP average the gradients over the ranks here
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
                factor = config.lr_factor(state.step, state.total_steps or config.warmup_steps + 1)
                for group, peak in zip(opt.param_groups, peaks):
                    group["lr"] = peak * factor
                opt.step()
                state.step += 1
                state.losses.append(distributed.mean(loss, world))
                state.tokens += batch.numel() * world.size
                state.seconds = seconds0 + time.perf_counter() - wall0
                state.cpu_seconds = cpu_seconds0 + time.process_time() - cpu0
                durations.append(now() - step_start)
                per_step = statistics.median(durations[-5:])
                if state.total_steps is None and state.step >= max(config.warmup_steps, 3):
                    # fix the schedule from the speed of the recent steps (the first ones warm caches up)
                    left = max_seconds - (now() - budget0)
                    state.total_steps = distributed.from_main(state.step + max(1, int(left / per_step)), world)
                    bar.total = state.total_steps
                    logger.info("time budget %.0f s: %d steps of %.2f s", max_seconds, state.total_steps, per_step)
                bar.update(1)
                bar.set_postfix({config.objective: f"{sum(state.losses[-10:]) / len(state.losses[-10:]):.3f}"})
                done = state.total_steps is not None and state.step >= state.total_steps
                # the next step is not started if it would end past the budget
                out_of_time = distributed.from_main(
                    max_seconds is not None and now() - budget0 + per_step > max_seconds, world)
                if folder is not None and (done or out_of_time or state.step % checkpoint_every == 0):
                    save_checkpoint(folder, state, params, opt, world)
                if on_step is not None:
                    on_step(state.step, state.losses[-1])
                if out_of_time:
                    break
    except (torch.distributed.DistError, RuntimeError) as e:
        if world.size == 1 or not _collective_failure(e):
            raise
        saved = f"the checkpoint in {folder} resumes it at any process count" if folder else "no checkpoint was kept"
        raise distributed.RankLostError(
            f"rank {world.rank} of {world.size}: a collective failed at step {state.step + 1} "
            f"({str(e).splitlines()[0]}): another process of the run was lost; {saved}: "
            "run the same command again") from e
    finally:
        bar.close()
        _set_form(mla, forms)
        for name, p in mla.program.named_parameters():
            p.requires_grad_(requires[name])
    return DistillReport(steps=state.step, total_steps=state.total_steps or state.step, losses=list(state.losses),
                         seconds=state.seconds, cpu_seconds=state.cpu_seconds, tokens=state.tokens,
                         autocast=autocast, processes=world.size)


def _check_tokens(tokens, vocab_size: int) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be integer token windows [N, L] with L >= 2, got {tuple(tokens.shape)} "
                         f"{tokens.dtype}")
    tokens = tokens.long()
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}) (the converted model's vocabulary)")
    return tokens


def _collective_failure(error: BaseException) -> bool:
    """Whether an error came from a collective whose peer went away (gloo / NCCL / a timeout)."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "pair closure"))


def _autocast(device: torch.device, dtype: str | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _batch_indices(seed: int, step: int, batch_size: int, n: int) -> torch.Tensor:
    """Sequences of ``step``: epochs are seeded permutations of the N windows, read in order."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[offset]))
    return torch.tensor(out, dtype=torch.long)


def _set_form(mla: MLAModel, form):
    """Set every latent module's form (a str, or a dict from a previous call); return the old ones."""
    old = {}
    for name, m in mla.program.named_modules():
        if isinstance(m, LatentAttention):
            old[name] = m.form
            m.form = form[name] if isinstance(form, dict) else form
    return old
