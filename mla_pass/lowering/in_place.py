"""Lowering: past inputs become preallocated buffers written in place (exported as TensorScatter)."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..modules.cache import cache_time_axis
from ..modules.kv_attention import KVCacheAttention
from ..modules.latent_attention import LatentAttention
from ..rewrite import MODULES
from .program import LoweringSettings, StepProgram


class InPlaceCacheMask(torch.nn.Module):
    """For preallocated cache buffers of length T_max ≥ T+S: attention_mask [B, T+S] → (bool
    [B, 1, S, T_max] that never attends past T+S, write index [B] = T for the new tokens, the same
    mask over the first T+S keys only: what a form that reads only the written keys takes)."""

    def __init__(self, time_axis: int):
        super().__init__()
        self.time_axis = time_axis

    def forward(self, attention_mask, input_ids, buffer):
        s, total = input_ids.shape[1], attention_mask.shape[1]
        t_max = buffer.shape[self.time_axis]
        padded = torch.nn.functional.pad(attention_mask, (0, t_max - total))
        causal = torch.ones(s, t_max, dtype=torch.bool, device=input_ids.device).tril(total - s)
        write_index = attention_mask.new_zeros(attention_mask.shape[0], dtype=torch.long) + (total - s)
        written = attention_mask.bool()[:, None, None, :] & causal[None, None, :, :total]   # its own tensor, no view
        return padded.bool()[:, None, None, :] & causal[None, None], write_index, written


def to_in_place(step: fx.GraphModule) -> fx.GraphModule:
    """Turn a step program (``rewrite(..., with_cache=True)``) into one whose past inputs are
    preallocated buffers updated by ``cache_write`` and returned as present (same length).
    Mutates ``step`` and its attention modules: call it on a copy."""
    graph = step.graph
    mask_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == "cache_mask")
    first_past = next(n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("past_"))
    first_kind = first_past.name.split("_", 2)[2]                      # past_{i}_{kind}
    step.add_submodule("cache_mask_in_place", InPlaceCacheMask(cache_time_axis(first_kind)))
    with graph.inserting_after(mask_node):
        pair = graph.call_module("cache_mask_in_place", (*mask_node.args, first_past))
    with graph.inserting_after(pair):
        mask = graph.call_function(operator.getitem, (pair, 0))
    with graph.inserting_after(mask):
        write_index = graph.call_function(operator.getitem, (pair, 1))
    with graph.inserting_after(write_index):
        valid_mask = graph.call_function(operator.getitem, (pair, 2))
    mask_node.replace_all_uses_with(mask)
    graph.erase_node(mask_node)
    for n in graph.nodes:
        if n.op == "call_module" and n.target.startswith(f"{MODULES}."):
            module = step.get_submodule(n.target)
            if isinstance(module, (LatentAttention, KVCacheAttention)):
                module.cache_update = "in_place"
                n.args = (*n.args, write_index)
            if isinstance(module, LatentAttention):     # the decompressed form of prompts reads the written keys only
                n.kwargs = {**n.kwargs, "valid_mask": valid_mask}
    graph.lint()
    step.recompile()
    return step


def lower_in_place(program: StepProgram, settings: LoweringSettings) -> int:
    """``cache_update="in_place"``: every site's past becomes a preallocated buffer → sites changed."""
    if settings.cache_update != "in_place" or program.cache_update == "in_place":
        return 0
    to_in_place(program.gm)
    program.cache_update = "in_place"
    return sum(isinstance(m, (LatentAttention, KVCacheAttention)) for m in program.gm.modules())
