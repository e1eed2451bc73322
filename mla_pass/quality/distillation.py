"""Second recovery stage: end-to-end distillation of a converted model to its original's logits.

Loss per position: τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), t the original's (teacher's) logits,
computed on the fly per batch under ``no_grad`` (no logit cache: 49k-vocabulary logits are big),
s the converted model's. Which weights move is a choice (``DistillConfig.train``): by default
only the latent attention modules' (down, up-projections, rope-key rows, biases), which keeps the
optimiser state small and leaves the rest of the model exactly the original's.

Optimiser: AdamW with a linear warm-up and a cosine decay, gradient clipping. Batch order is a
pure function of (seed, step), and a checkpoint holds the trained weights, the AdamW moments and
the step, so a run stopped by a time limit and resumed gives bit-for-bit the weights of an
uninterrupted run (same machine, same thread count). Checkpoints are ``distill.safetensors`` +
``distill.json`` in a folder, written atomically.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..model import MLAModel, require_converted
from ..modules.latent_attention import LatentAttention
from ..persist import finish_pair, write_pair

logger = logging.getLogger(__name__)

TRAIN_SETS = ("latent", "latent+norms", "all")
CHECKPOINT_WEIGHTS = "distill.safetensors"
CHECKPOINT_STATE = "distill.json"


@dataclass(frozen=True)
class DistillConfig:
    """Args:
        steps: optimiser steps; ``None``: as many as fit in the time budget (``distill(max_seconds=...)``),
            estimated from the warm-up steps' speed and then fixed (and checkpointed).
        lr: peak learning rate of the latent attention weights (1e-3 beat 3e-3 on SmolLM2-135M).
        other_lr: peak learning rate of the other trained weights (``train`` "latent+norms" / "all").
        batch_size: sequences per step.
        temperature: τ of the distillation loss (1 = plain KL).
        train: "latent" (the converted attention modules), "latent+norms" (also every 1-d
            weight: norms, biases) or "all" (every weight, embeddings included).
        warmup_steps: linear warm-up; then cosine decay to ``min_lr_ratio`` of the peak.
        min_lr_ratio: floor of the cosine decay.
        weight_decay: AdamW's (0 by default: decay would pull the SVD start towards zero).
        grad_clip: max global gradient norm (``None``: no clipping).
        seed: batch order.
        autocast: run the forward passes under ``torch.autocast`` in this dtype ("bfloat16"),
            weights and optimiser state staying float32; about 1.7× faster on CPUs with bf16
            instructions (measured on SmolLM2-135M). ``None``: plain float32.
    """
    steps: int | None = 200
    lr: float = 1e-3
    other_lr: float = 3e-5
    batch_size: int = 2
    temperature: float = 1.0
    train: str = "latent"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    autocast: str | None = None

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None for a time budget), got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and self.other_lr >= 0):
            raise ValueError(f"lr must be > 0 and other_lr >= 0, got lr={self.lr}, other_lr={self.other_lr}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.train not in TRAIN_SETS:
            raise ValueError(f"train must be one of {TRAIN_SETS}, got {self.train!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise ValueError("warmup_steps >= 0, 0 <= min_lr_ratio <= 1 and weight_decay >= 0 are required")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(total - self.warmup_steps, 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class DistillReport:
    steps: int                   # steps done in total (this call and any resumed before)
    total_steps: int             # the schedule's length
    losses: list[float] = field(default_factory=list)     # training loss per step (all calls)
    seconds: float = 0.0         # wall time (all calls)
    cpu_seconds: float = 0.0     # process CPU time (all calls)
    tokens: int = 0              # training tokens seen (all calls)

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


def distill(mla: MLAModel, original: torch.nn.Module, tokens, config: DistillConfig | None = None, *,
            max_seconds: float | None = None, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int = 25, progress: bool = True, clock: str = "wall") -> DistillReport:
    """Train ``mla`` (in place) to match ``original``'s next-token distributions on ``tokens``.

    Args:
        mla: a converted model (``mla_pass.convert`` / ``mla_pass.load``).
        original: the model it was converted from (the teacher; not modified).
        tokens: training token ids ``[N, L]`` (e.g. 512-token windows of text that is not the
            evaluation text; ``quality.windows.training_windows``).
        config: a ``DistillConfig``.
        max_seconds: stop after the step that crosses this many seconds of ``clock`` (resume from
            ``checkpoint``); with ``config.steps=None`` it also sets the schedule's length.
        checkpoint: a folder; if it holds a checkpoint of the same config and tokens, training
            continues from it; one is written every ``checkpoint_every`` steps and at the end.
        progress: a progress bar.
        clock: what ``max_seconds`` measures: "wall" time, or this process's "cpu" time (not
            counting time the process is paused or waits for a shared CPU; with T threads it
            runs up to T× faster than wall time).

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
    if config.steps is None and max_seconds is None:
        raise ValueError("DistillConfig(steps=None) trains for a time budget: pass max_seconds")
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be integer token windows [N, L] with L >= 2, got {tuple(tokens.shape)} "
                         f"{tokens.dtype}")
    tokens = tokens.long()
    if int(tokens.min()) < 0 or int(tokens.max()) >= mla.vocab_size:
        raise ValueError(f"token ids must be in [0, {mla.vocab_size}) (the converted model's vocabulary)")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")

    params = trainable_parameters(mla, config.train)
    if not params:
        raise ValueError("the model has no latent attention weights to train: was it converted?")
    latent = {id(p) for m in mla.program.modules() if isinstance(m, LatentAttention) for p in m.parameters()}
    groups = [{"params": [p for p in params.values() if id(p) in latent], "lr": config.lr}]
    others = [p for p in params.values() if id(p) not in latent]
    if others:
        groups.append({"params": others, "lr": config.other_lr})
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    peaks = [g["lr"] for g in opt.param_groups]

    state = _State(config=asdict(config), tokens_key=_tokens_key(tokens), step=0, total_steps=config.steps,
                   losses=[], seconds=0.0, cpu_seconds=0.0, tokens=0)
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None:
        finish_pair(folder / CHECKPOINT_WEIGHTS, folder / CHECKPOINT_STATE)     # a checkpoint write cut short
    if folder is not None and (folder / CHECKPOINT_STATE).is_file():
        state = _load_checkpoint(folder, state, params, opt)

    device = next(mla.program.parameters()).device
    teacher_device = next(iter(original.parameters())).device
    positions = torch.arange(tokens.shape[1], device=device)[None]
    forms = _set_form(mla, "decompressed")            # training uses the prompt form; restored below
    requires = {n: p.requires_grad for n, p in mla.program.named_parameters()}
    for name, p in mla.program.named_parameters():
        p.requires_grad_(name in params)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    seconds0, cpu_seconds0 = state.seconds, state.cpu_seconds
    bar = tqdm(total=state.total_steps, initial=state.step, desc="distilling", disable=not progress)
    now = time.perf_counter if clock == "wall" else time.process_time
    budget0 = now()
    try:
        while state.total_steps is None or state.step < state.total_steps:
            step_start = now()
            idx = _batch_indices(config.seed, state.step, config.batch_size, tokens.shape[0])
            batch = tokens[idx]
            with torch.no_grad(), _autocast(teacher_device, config.autocast):
                teacher = logits_of(original, batch.to(teacher_device)).to(device)
            inputs = (batch.to(device),) + ((positions.expand(len(idx), -1),) if mla.takes_positions else ())
            with _autocast(device, config.autocast):
                student = mla.program(*inputs)
            student = student[0] if isinstance(student, (tuple, list)) else student
            loss = distillation_loss(student, teacher, config.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
            factor = config.lr_factor(state.step, state.total_steps or config.warmup_steps + 1)
            for group, peak in zip(opt.param_groups, peaks):
                group["lr"] = peak * factor
            opt.step()
            state.step += 1
            state.losses.append(loss.item())
            state.tokens += batch.numel()
            state.seconds = seconds0 + time.perf_counter() - wall0
            state.cpu_seconds = cpu_seconds0 + time.process_time() - cpu0
            if state.total_steps is None and state.step >= max(config.warmup_steps, 3):
                # fix the schedule from the speed of the steps after the first (warm-up effects)
                per_step = now() - step_start
                state.total_steps = max(state.step + 1, int(max_seconds / max(per_step, 1e-6)))
                bar.total = state.total_steps
                logger.info("time budget %.0f s: %d steps of %.2f s", max_seconds, state.total_steps, per_step)
            bar.update(1)
            bar.set_postfix(kl=f"{sum(state.losses[-10:]) / len(state.losses[-10:]):.3f}")
            done = state.total_steps is not None and state.step >= state.total_steps
            out_of_time = max_seconds is not None and now() - budget0 > max_seconds
            if folder is not None and (done or out_of_time or state.step % checkpoint_every == 0):
                _save_checkpoint(folder, state, params, opt)
            if out_of_time:
                break
    finally:
        bar.close()
        _set_form(mla, forms)
        for name, p in mla.program.named_parameters():
            p.requires_grad_(requires[name])
    return DistillReport(steps=state.step, total_steps=state.total_steps or state.step, losses=list(state.losses),
                         seconds=state.seconds, cpu_seconds=state.cpu_seconds, tokens=state.tokens)


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


def _tokens_key(tokens: torch.Tensor) -> str:
    import hashlib
    return f"{tuple(tokens.shape)}:{hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]}"


@dataclass
class _State:
    config: dict
    tokens_key: str
    step: int
    total_steps: int | None
    losses: list
    seconds: float
    cpu_seconds: float
    tokens: int


def _save_checkpoint(folder: Path, state: _State, params: dict, opt: torch.optim.Optimizer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in params.items():
        tensors[f"param.{name}"] = p.detach().contiguous().cpu()
        moments = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                tensors[f"{key}.{name}"] = moments[key].detach().contiguous().cpu()
        if "step" in moments:
            tensors[f"step.{name}"] = torch.as_tensor(moments["step"], dtype=torch.float64).reshape(1).cpu()
    write_pair(folder / CHECKPOINT_WEIGHTS, tensors, folder / CHECKPOINT_STATE, asdict(state))   # one checkpoint


def _load_checkpoint(folder: Path, fresh: _State, params: dict, opt: torch.optim.Optimizer) -> _State:
    from safetensors.torch import load_file

    record = json.loads((folder / CHECKPOINT_STATE).read_text())
    record.pop("weights_sha256", None)              # write_pair's checksum of the weights file
    saved = _State(**record)
    if saved.config != fresh.config:
        raise ValueError(f"the distillation checkpoint in {folder} was made with {saved.config}, not {fresh.config}: "
                         "resume with the same DistillConfig or use another checkpoint folder")
    if saved.tokens_key != fresh.tokens_key:
        raise ValueError(f"the distillation checkpoint in {folder} was made on other training tokens "
                         f"({saved.tokens_key}, now {fresh.tokens_key}): resume with the same tokens")
    tensors = load_file(str(folder / CHECKPOINT_WEIGHTS))
    missing = [n for n in params if f"param.{n}" not in tensors]
    wrong = [n for n, p in params.items() if f"param.{n}" in tensors and tensors[f"param.{n}"].shape != p.shape]
    if missing or wrong:
        raise ValueError(f"the distillation checkpoint in {folder} does not fit this model (missing {missing[:3]}, "
                         f"wrong shape {wrong[:3]}): use the model and options it was made with")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
            if f"exp_avg.{name}" in tensors:
                opt.state[p] = {"step": torch.tensor(float(tensors[f"step.{name}"][0])),
                                "exp_avg": tensors[f"exp_avg.{name}"].to(p.device),
                                "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(p.device)}
    logger.info("resuming distillation at step %d of %s", saved.step, saved.total_steps)
    return saved
