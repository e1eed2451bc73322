"""The static-cache step program: preallocated buffers written in place at given slots, fixed shapes per decode step.

``to_static_cache(step)`` turns a step program (``MLAModel.step`` or the baseline's, concatenating
its cache) into one over ``(input_ids [B,S], position_ids [B,S], attention_mask [B,T_max],
*buffers, cache_position [S])``: the buffers hold T_max tokens, ``attention_mask`` marks the slots
that hold real tokens (past and the S new ones, left padding 0) and ``cache_position`` the slots
the new tokens go to. Each site writes them with ``index_copy_`` into its buffers (no copy, no
host sync, as gpt-fast's static KV cache) and attends over the whole buffer, masked. A decode step
(S = 1) then has the same shapes at every position, so ``torch.compile(mode="reduce-overhead")``
can capture it once as a CUDA graph. On any device it computes what the concatenating program
computes (masked slots take no weight).

The result shares the step's weights: its attention modules are shallow copies (a module's modes
are per instance), so converting to the static form leaves ``step`` as it was.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ..modules.kv_attention import KVCacheAttention
from ..modules.latent_attention import LatentAttention
from ..rewrite import MODULES


class StaticCacheMask(torch.nn.Module):
    """attention_mask [B, T_max] (1 = a slot holding a real token), cache_position [S] → bool
    [B, 1, S, T_max]: each new token attends the real tokens up to its own slot."""

    def forward(self, attention_mask, input_ids, cache_position):
        slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        causal = slots[None, :] <= cache_position[:, None]                          # [S, T_max]
        return attention_mask.bool()[:, None, None, :] & causal[None, None]


def to_static_cache(step: fx.GraphModule) -> fx.GraphModule:
    """A new program over preallocated buffers (see the module docstring); ``step`` is not changed."""
    nodes = list(step.graph.nodes)
    if any(n.op == "call_module" and n.target in ("cache_mask_in_place", "cache_mask_static") for n in nodes):
        raise ValueError("to_static_cache takes the concatenating step program (MLAModel.step), not a lowered one")
    if not any(n.op == "call_module" and n.target == "cache_mask" for n in nodes):
        raise ValueError("this program has no cache mask: it is not a step program with a cache")
    graph = copy.deepcopy(step.graph)
    program = fx.GraphModule(step, graph)        # the same submodules as step ...
    for n in graph.nodes:                        # ... but its own copies of the attention modules
        if n.op == "call_module" and n.target.startswith(f"{MODULES}."):
            module = program.get_submodule(n.target)
            if isinstance(module, (LatentAttention, KVCacheAttention)):
                static = copy.copy(module)                # shares parameters and buffers
                static.cache_update = "static"
                parent, _, name = n.target.rpartition(".")
                setattr(program.get_submodule(parent), name, static)
    mask_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == "cache_mask")
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        cache_position = graph.placeholder("cache_position")
    program.add_submodule("cache_mask_static", StaticCacheMask())
    with graph.inserting_after(mask_node):
        mask = graph.call_module("cache_mask_static", (*mask_node.args, cache_position))
    mask_node.replace_all_uses_with(mask)
    graph.erase_node(mask_node)
    for n in graph.nodes:
        if n.op == "call_module" and n.target.startswith(f"{MODULES}."):
            if isinstance(program.get_submodule(n.target), (LatentAttention, KVCacheAttention)):
                n.args = (*n.args, cache_position)
    graph.lint()
    program.recompile()
    return program
