"""Cheap recovery: refit each converted attention block to the original block's outputs.

Layer-by-layer reconstruction: run the *original* program once on calibration tokens and keep,
per site, what its attention core saw and produced (hidden state, raw and rotated queries, the
rotated keys, the mask, and the core's output). Then, one site at a time, train that site's
latent attention module (down-projection, up-projections, biases) with Adam to reproduce the
output from the same inputs. Sites are independent, so only one is trained at a time and the
result does not depend on the order. The rope-key projection stays frozen: its rows are exact
copies of the original key's, so the recorded rotated keys are its output.

With ``RecoveryConfig(distill=DistillConfig(...))`` the layer-wise stage is followed by
end-to-end distillation to the original's logits (``mla_pass.distill``), usually on more text.

Inside a ``torch.distributed`` process group the sites are shared out in rounds: in each round
every rank fits one site, then each fitted site's weights are broadcast from the rank that fitted
it, so every rank ends with the same model (``sequential`` needs the sites in order and refuses).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..frontend.capture import capture
from ..graph import clone_graph_module, insert_observer, run_on_tokens
from ..model import MLAModel, require_converted
from ..modules.latent_attention import LatentAttention
from ..plan.calibrate import as_token_batches
from . import distributed
from .distillation import DistillConfig, DistillReport, distill
from .distributed import World

logger = logging.getLogger(__name__)

TRAINABLE = ("down", "up_key", "up_value", "key_bias", "value_bias")


@dataclass(frozen=True)
class RecoveryConfig:
    """Args:
        steps: Adam steps per site (0: skip the layer-wise stage).
        lr: peak learning rate (cosine decay to 10% after a 10% warm-up).
        batch_size: calibration sequences per step.
        train: which module weights move (any of ``TRAINABLE``).
        seed: makes batch order and results reproducible.
        sequential: feed each site the inputs the *converted* model gives it (earlier sites
            already refitted), so it also learns to undo upstream error; targets stay the
            original's. Costs one partial forward pass per site.
        distill: a ``DistillConfig``: after the layer-wise stage, distil end to end.
    """
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 2
    train: tuple[str, ...] = TRAINABLE
    seed: int = 0
    sequential: bool = False
    distill: DistillConfig | None = None

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("steps must be >= 0 (0: no layer-wise stage), batch_size >= 1 and lr > 0")
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise TypeError(f"distill must be a DistillConfig or None, got {type(self.distill).__name__}")
        unknown = set(self.train) - set(TRAINABLE)
        if unknown:
            raise ValueError(f"unknown trainable weights {sorted(unknown)}; choose from {TRAINABLE}")


@dataclass
class SiteRecovery:
    layer: str
    loss_before: float          # relative MSE of the core output, ‖Δ‖² / ‖out‖²
    loss_after: float


@dataclass
class RecoveryReport:
    sites: list[SiteRecovery] = field(default_factory=list)
    remaining: list[int] = field(default_factory=list)     # site indices not reached (time limit)
    distill: DistillReport | None = None                    # the end-to-end stage, if it ran

    def mean(self, attr: str) -> float:
        return sum(getattr(s, attr) for s in self.sites) / max(len(self.sites), 1)


class _Keep(torch.nn.Module):
    """Observer that stores its input (on CPU) and passes it through."""

    def __init__(self):
        super().__init__()
        self.values: list[torch.Tensor] = []

    def forward(self, t):
        if t is not None:
            self.values.append(t.detach().to("cpu"))
        return t


def record_attention_io(original: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 4,
                        progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Per site of the original model: x, query_raw, query, key_head, mask, out over ``tokens``."""
    from ..frontend.sites import find_sites
    captured = capture(original)
    sites, _ = find_sites(captured)
    probe, mapping = clone_graph_module(captured.gm)
    keep: dict[tuple[int, str], _Keep] = {}
    for site in sites:
        nodes = {"x": site.hidden, "query_raw": site.query_raw, "query": site.core.query,
                 "key_head": site.key_head, "out": site.core.output}
        if site.core.mask is not None:
            nodes["mask"] = site.core.mask
        for name, node in nodes.items():
            keep[(site.index, name)] = _Keep()
            insert_observer(probe, mapping[node], f"_mla_keep_{site.index}_{name}", keep[(site.index, name)])
    probe.recompile()
    run_on_tokens(probe, tokens, captured.takes_positions, batch_size=batch_size, desc="recording activations",
                  progress=progress)
    return {s.index: {name: torch.cat(obs.values) for (i, name), obs in keep.items() if i == s.index}
            for s in sites}


def recover(mla: MLAModel, original: torch.nn.Module, tokens, config: RecoveryConfig | None = None, *,
            progress: bool = True, skip_sites=(), max_seconds: float | None = None,
            on_site_done: Callable[[int, SiteRecovery], None] | None = None, distill_tokens=None,
            distill_seconds: float | None = None, checkpoint=None) -> RecoveryReport:
    """Refit every converted site of ``mla`` to ``original``'s attention outputs on ``tokens``,
    then (with ``config.distill``) distil the whole model to ``original``'s logits.

    Args:
        mla: a converted model (modified in place).
        original: the model it was converted from.
        tokens: calibration token ids [N, L] (e.g. 8 × 512 tokens of text).
        config: a ``RecoveryConfig``.
        skip_sites: site indices already refitted (resuming from a checkpoint).
        max_seconds: a site that would end past this many seconds is not started (the report
            lists what is left); at least one site is fitted per call.
        on_site_done: called with (site index, its result) after each site, e.g. to checkpoint.
        distill_tokens: training windows for distillation (default: ``tokens``); more text than
            the layer-wise stage needs, e.g. ``quality.windows.training_windows(tok)``.
        distill_seconds, checkpoint: ``distill``'s ``max_seconds`` and ``checkpoint``. The
            distillation stage runs only when every site is done.

    Example:
        >>> report = recover(mla, model, calibration_ids)                 # doctest: +SKIP
        >>> report.mean("loss_before"), report.mean("loss_after")         # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    start = time.monotonic()                           # the budget counts the recording pass too
    config = config or RecoveryConfig()
    if not isinstance(config, RecoveryConfig):
        raise TypeError(f"config must be a RecoveryConfig, got {type(config).__name__}")
    require_converted(mla, "recover")
    tokens = as_token_batches(tokens)
    if int(tokens.max()) >= mla.vocab_size:
        raise ValueError(f"token ids must be below the vocabulary size {mla.vocab_size}")
    modules = {m.plan.index: m for m in mla.program.modules() if isinstance(m, LatentAttention)}
    todo = [i for i in sorted(modules) if i not in set(skip_sites)] if config.steps > 0 else []
    report = RecoveryReport()
    records = record_attention_io(original, tokens, progress=progress) if todo else {}
    missing = sorted(set(todo) - set(records))
    if missing:
        raise ValueError(f"sites {missing} of the converted model are not in the original model: "
                         "pass the model it was converted from")
    world = World.current()
    if world.size > 1 and config.sequential and todo:
        raise ValueError("sequential layer-wise recovery feeds each site the sites before it: it runs on one "
                         "process (drop sequential, or run the layer-wise stage alone first)")
    rounds = []
    bar = tqdm(total=len(todo), desc="reconstructing", disable=not (progress and world.main))
    for first in range(0, len(todo), world.size):       # one site per rank per round
        # a round that would end past the budget is not started (its length: the median round so far)
        late = rounds and max_seconds is not None and \
            time.monotonic() - start + statistics.median(rounds) > max_seconds
        if distributed.from_main(bool(late), world):
            report.remaining = todo[first:]
            break
        round_start = time.monotonic()
        batch = todo[first:first + world.size]
        result = None
        if world.rank < len(batch):
            index = batch[world.rank]
            rec = records.pop(index)
            if config.sequential:
                rec.update(_converted_inputs(mla, modules[index], tokens))
            else:
                rec["key_rope_full"] = _replayed_rope_keys(modules[index], rec)
            result = _fit_site(modules[index], rec, config)
        results = _share_round(modules, batch, result, world)
        for index, (before, after) in zip(batch, results):
            report.sites.append(SiteRecovery(modules[index].plan.layer, before, after))
            bar.update(1)
            bar.set_postfix(loss=f"{before:.3f}→{after:.3f}")
            if on_site_done is not None:
                on_site_done(index, report.sites[-1])
        rounds.append(time.monotonic() - round_start)
    bar.close()
    if config.distill is not None and not report.remaining:
        report.distill = distill(mla, original, tokens if distill_tokens is None else distill_tokens, config.distill,
                                 max_seconds=distill_seconds, checkpoint=checkpoint, progress=progress)
    return report


def _share_round(modules: dict, batch: list[int], result, world: World) -> list[tuple[float, float]]:
    """Each site of the round's weights from the rank that fitted it, and every site's (before, after) losses."""
    if world.size == 1:
        return [result]
    import torch.distributed as dist
    results = [None] * world.size
    dist.all_gather_object(results, result)
    with torch.no_grad():
        for owner, index in enumerate(batch):
            for p in modules[index].parameters():
                dist.broadcast(p.data, src=owner)
    return results[:len(batch)]


class _Stop(Exception):
    pass


def _converted_inputs(mla: MLAModel, module: LatentAttention, tokens: torch.Tensor,
                      batch_size: int = 4) -> dict[str, torch.Tensor]:
    """The arguments the converted forward program passes to ``module`` on ``tokens``
    (each pass stops right after that call)."""
    seen: dict[str, list] = {"x": [], "query_raw": [], "query": [], "key_rope_full": [], "mask": []}

    def grab(_mod, args):
        for name, value in zip(seen, args):
            seen[name].append(None if value is None else value.detach().to("cpu"))
        raise _Stop

    handle = module.register_forward_pre_hook(grab)
    device = next(mla.program.parameters()).device
    try:
        with torch.no_grad():
            for batch in torch.split(tokens, batch_size):
                batch = batch.to(device)
                args = (batch,) + ((torch.arange(batch.shape[1], device=device).expand_as(batch).contiguous(),)
                                   if mla.takes_positions else ())
                try:
                    mla.program(*args)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return {name: torch.cat(vals) for name, vals in seen.items() if vals and vals[0] is not None}


def _replayed_rope_keys(module: LatentAttention, rec: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The module's rope-key input, from the original's rotated keys mixed across kv heads (exact:
    the rope-key rows are the original key's, mixed by ``rope_mix``, and RoPE commutes with the
    mix; normalised keys are un-scaled, the module scales them itself)."""
    if module.rope_key is None:
        return None
    key = rec["key_head"]
    if module.plan.key_norm:
        with torch.no_grad():
            scale = module.key_scale(rec["x"].to(module.down.device)).to(key.device)
        key = key / scale.expand(-1, module.plan.n_kv_heads, -1)[..., None]
    with torch.no_grad():
        return module.mix_keys(key.to(module.rope_mix.device)).to(key.device)


def _fit_site(module: LatentAttention, rec: dict[str, torch.Tensor], config: RecoveryConfig) -> tuple[float, float]:
    device = module.down.device
    params = [getattr(module, name) for name in config.train if getattr(module, name, None) is not None]
    frozen = [p for p in module.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    n = rec["x"].shape[0]
    mask_per_sequence = "mask" in rec and rec["mask"].shape[0] == n

    def batch_loss(idx) -> torch.Tensor:
        x = rec["x"][idx].to(device)
        key_full = rec["key_rope_full"][idx].to(device) if rec.get("key_rope_full") is not None else None
        mask = None
        if "mask" in rec:
            mask = (rec["mask"][idx] if mask_per_sequence else rec["mask"][: len(idx)]).to(device)
        out = module(x, rec["query_raw"][idx].to(device), rec["query"][idx].to(device), key_full, mask)
        target = rec["out"][idx].to(device)
        return (out - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-12)

    def full_loss() -> float:
        with torch.no_grad():
            return sum(batch_loss(torch.arange(i, min(i + config.batch_size, n))).item() * min(config.batch_size, n - i)
                       for i in range(0, n, config.batch_size)) / n

    before = full_loss()
    opt = torch.optim.Adam(params, lr=config.lr)
    warm = max(1, config.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps)))))
    gen = torch.Generator().manual_seed(config.seed + module.plan.index)
    saved = {id(p): p.detach().clone() for p in params}
    form = module.form
    module.form = "decompressed"
    for _ in range(config.steps):
        idx = torch.randperm(n, generator=gen)[: config.batch_size]
        opt.zero_grad(set_to_none=True)
        batch_loss(idx).backward()
        opt.step()
        sched.step()
    module.form = form
    after = full_loss()
    if after > before:          # never leave a site worse than the SVD start
        with torch.no_grad():
            for p in params:
                p.copy_(saved[id(p)])
        after = before
    for p in module.parameters():
        p.requires_grad_(True)
    return before, after
