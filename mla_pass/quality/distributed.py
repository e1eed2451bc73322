"""Recovery on many processes: the process group torchrun sets up, each rank's shard, one writer.

``distill`` is data-parallel when it runs inside an initialised ``torch.distributed`` process group
(``torchrun --nproc_per_node N ...`` or ``mla-pass recover --nproc N``): every step's global batch
(a pure function of seed and step) is split across the ranks, each rank runs the teacher and the
student on its share, and PyTorch averages the gradients — ``DistributedDataParallel`` (every
rank holds the whole model) or FSDP2's ``fully_shard`` (parameters, gradients and AdamW moments
sharded across the ranks; the forward gathers each one when it is used). Gloo on CPU, NCCL on
CUDA. Decisions that must agree (stop now? how many steps fit the budget?) are made by rank 0 and
broadcast; only rank 0 writes checkpoints, which hold full tensors, so a run resumes at any world
size. Collectives carry a timeout, so a lost rank ends the run instead of hanging it.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 300.0     # a rank silent this long is taken as lost (gloo/NCCL raise, the run stops)
PARALLEL = ("ddp", "fsdp")


class RankLostError(RuntimeError):
    """A collective failed or timed out: another process of the run stopped."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size`` (``World()``: a single process)."""
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def join(device: str | torch.device = "cpu", timeout_s: float = COLLECTIVE_TIMEOUT_S) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA).

    Does nothing in a process torchrun did not start (no ``WORLD_SIZE``) or in a group already
    initialised. On CUDA each rank takes the device ``LOCAL_RANK`` names.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World.current()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return World.current()


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of a global batch: every ``size``-th sequence from ``rank``."""
    if len(indices) % world.size:
        raise ValueError(f"the batch of {len(indices)} sequences does not split evenly over {world.size} processes: "
                         f"make batch_size a multiple of the process count")
    return indices[world.rank::world.size]


def mean(value: torch.Tensor, world: World) -> float:
    """The mean of a scalar over the ranks (each rank's share is the same size)."""
    if world.size == 1:
        return float(value.detach())
    total = value.detach().double().reshape(1).cpu().clone()
    dist.all_reduce(total)
    return float(total) / world.size


def from_main(value, world: World):
    """Rank 0's ``value`` on every rank (a picklable object: a decision all ranks must share)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter or moment; a collective for DTensors."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``reference``: sharded the same way if it is a DTensor."""
    if _is_dtensor(reference):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(value.to(reference.device), reference.device_mesh, reference.placements)
    return value.to(reference.device)


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def parallel_module(module: torch.nn.Module, world: World, parallel: str):
    """``module`` made data-parallel for the block: yields what to call in its place.

    "ddp" wraps it (the module keeps its own parameters); "fsdp" shards it in place with
    ``fully_shard`` and, on the way out, gathers every parameter back into a plain full tensor
    and takes FSDP's hooks off, so the module is an ordinary one again.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if world.size == 1:
        yield module
        return
    device = next(module.parameters()).device
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # buffers (rotary tables) are equal on every rank: synced once at init, not before every forward
        yield DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
        return
    from torch.distributed.fsdp import fully_shard
    cls = type(module)
    fully_shard(module)
    try:
        yield module
    finally:
        _unshard_for_good(module, cls)


def _unshard_for_good(module: torch.nn.Module, cls: type) -> None:
    """Undo ``fully_shard(module)``: whole plain parameters, no FSDP hooks, the original class."""
    state = module._get_fsdp_state()
    gathered = {name: full(p.detach()) for name, p in module.named_parameters()}     # collective: all ranks
    for handle in (getattr(state, "_pre_forward_hook_handle", None), getattr(state, "_post_forward_hook_handle", None)):
        if handle is not None:
            handle.remove()
    module.__class__ = cls
    for name, value in gathered.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        requires_grad = owner._parameters[leaf].requires_grad
        owner._parameters[leaf] = torch.nn.Parameter(value.clone(), requires_grad=requires_grad)
