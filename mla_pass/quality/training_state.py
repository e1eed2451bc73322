"""A training run's checkpoint: its state (step, schedule, losses, clocks) and tensors (weights, AdamW moments).

``distill.safetensors`` holds, per trained parameter, ``param.NAME``, ``exp_avg.NAME``,
``exp_avg_sq.NAME`` and ``step.NAME``, always whole tensors (FSDP shards are gathered first), so
a checkpoint resumes at any number of processes; ``distill.json`` holds the ``State``. The pair is
written by rank 0 only, atomically (``persist.write_pair``), while the other ranks wait.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..persist import write_pair
from . import distributed
from .distributed import World

logger = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "distill.safetensors"
CHECKPOINT_STATE = "distill.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class State:
    config: dict                 # the DistillConfig, as JSON reads it back
    tokens_key: str              # the training tokens' shape and checksum
    step: int
    total_steps: int | None
    losses: list
    seconds: float
    cpu_seconds: float
    tokens: int
    autocast: str | None = None  # the dtype the run chose ("float32", "bfloat16", ...): a resumed run keeps it


def tokens_key(tokens: torch.Tensor) -> str:
    return f"{tuple(tokens.shape)}:{hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]}"


def save_checkpoint(folder: Path, state: State, params: dict, opt: torch.optim.Optimizer, world: World) -> None:
    """Every rank takes part (gathering sharded tensors); rank 0 writes; all leave together."""
    tensors = {}
    for name, p in params.items():
        tensors[f"param.{name}"] = distributed.full(p.detach()).contiguous().cpu()
        moments = opt.state.get(p, {})
        for key in MOMENTS:
            if key in moments:
                tensors[f"{key}.{name}"] = distributed.full(moments[key].detach()).contiguous().cpu()
        if "step" in moments:
            step = distributed.full(moments["step"])
            tensors[f"step.{name}"] = torch.as_tensor(step, dtype=torch.float64).reshape(1).cpu()
    if world.main:
        folder.mkdir(parents=True, exist_ok=True)
        write_pair(folder / CHECKPOINT_WEIGHTS, tensors, folder / CHECKPOINT_STATE, asdict(state))   # one checkpoint
    distributed.barrier(world)


def read_state(folder: Path, fresh: State) -> State:
    """The saved state, if it was made with ``fresh``'s config and tokens (else a clear error)."""
    record = json.loads((folder / CHECKPOINT_STATE).read_text())
    record.pop("weights_sha256", None)              # write_pair's checksum of the weights file
    saved = State(**record)
    if saved.config != fresh.config:
        raise ValueError(f"the distillation checkpoint in {folder} was made with {saved.config}, not {fresh.config}: "
                         "resume with the same DistillConfig or use another checkpoint folder")
    if saved.tokens_key != fresh.tokens_key:
        raise ValueError(f"the distillation checkpoint in {folder} was made on other training tokens "
                         f"({saved.tokens_key}, now {fresh.tokens_key}): resume with the same tokens")
    logger.info("resuming distillation at step %d of %s", saved.step, saved.total_steps)
    return saved


def load_tensors(folder: Path, params: dict, opt: torch.optim.Optimizer) -> None:
    """Weights and AdamW moments from the checkpoint into ``params`` / ``opt`` (sharded as they are)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / CHECKPOINT_WEIGHTS))
    missing = [n for n in params if f"param.{n}" not in tensors]
    wrong = [n for n, p in params.items() if f"param.{n}" in tensors and tensors[f"param.{n}"].shape != p.shape]
    if missing or wrong:
        raise ValueError(f"the distillation checkpoint in {folder} does not fit this model (missing {missing[:3]}, "
                         f"wrong shape {wrong[:3]}): use the model and options it was made with")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(distributed.like(tensors[f"param.{name}"], p))
            if f"exp_avg.{name}" in tensors:
                opt.state[p] = {"step": torch.tensor(float(tensors[f"step.{name}"][0])),
                                **{key: distributed.like(tensors[f"{key}.{name}"], p) for key in MOMENTS}}
