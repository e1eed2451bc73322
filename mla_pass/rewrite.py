"""Graph surgery: replace each matched attention core by a call to its latent attention module.

Per site, in a copy of the captured graph::

    key_rope_full = mla.{i}.rope_key(x)                       # only the kept rotated dims
    key_rope      = <copy of the model's RoPE region>(key_rope_full)
    out_BHSDv     = mla.{i}(x, query_raw, query, key_rope, mask[, *past])

``out`` replaces the core's output; the old k/v projections, repeat_kv and the core become
dead and are removed. With ``with_cache=True`` the program gains inputs ``attention_mask
[B, T+S]`` and per site ``past_latent [B, T, C]`` (+ ``past_rope_key [B, Hkv, T, R]`` where
RoPE is kept, + ``past_key_scale [B, G, T]`` where k is RMS-normalised) and returns
``(logits, *present)`` in the same order. Its mask is causal over the cache plus padding from
``attention_mask`` (the model's own mask computation, which only knows the current tokens,
becomes dead code).

Guarantee: at full rank with every rotary pair kept the program computes the original
function (tests: ≤ 1e-4 on fp32 logits); otherwise the error is the one the plan's rank and
kept pairs imply. Sites that ``match`` refused are not touched. With ``KVCacheAttention`` modules (cache kinds
``key``/``value``, with_cache only) the same surgery yields the unconverted baseline's step program.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import graph as G
from .kv_attention import KVCacheAttention
from .latent_attention import LatentAttention, cache_time_axis
from .match import AttentionSite

MODULES = "mla"


@dataclass(frozen=True)
class CacheTensor:
    name: str        # "past_key_values.{i}.latent" | "past_key_values.{i}.rope_key"
    site: int
    kind: str        # "latent" | "rope_key" | "key_scale"


class CacheMask(torch.nn.Module):
    """attention_mask [B, T+S] (1 = real token) → bool [B, 1, S, T+S]: causal over the cache."""

    def forward(self, attention_mask, input_ids):
        s, total = input_ids.shape[1], attention_mask.shape[1]
        causal = torch.ones(s, total, dtype=torch.bool, device=input_ids.device).tril(total - s)
        return attention_mask.bool()[:, None, None, :] & causal[None, None]


class InPlaceCacheMask(torch.nn.Module):
    """For preallocated cache buffers of length T_max ≥ T+S: attention_mask [B, T+S] → (bool
    [B, 1, S, T_max] that never attends past T+S, write index [B] = T for the new tokens)."""

    def __init__(self, time_axis: int):
        super().__init__()
        self.time_axis = time_axis

    def forward(self, attention_mask, input_ids, buffer):
        s, total = input_ids.shape[1], attention_mask.shape[1]
        t_max = buffer.shape[self.time_axis]
        padded = torch.nn.functional.pad(attention_mask, (0, t_max - total))
        causal = torch.ones(s, t_max, dtype=torch.bool, device=input_ids.device).tril(total - s)
        write_index = attention_mask.new_zeros(attention_mask.shape[0], dtype=torch.long) + (total - s)
        return padded.bool()[:, None, None, :] & causal[None, None], write_index


class GroupQueryCacheInputs(torch.nn.Module):
    """attention_mask [B, T+S] (left padding) → the inputs ``gqa_op.group_query_attention`` takes
    besides q/k/v and the buffers: (attention_bias [B, 1, S, T+S], seqlens_k [B] = T+S−1,
    total_sequence_length = T+S, query_seqlens [B] = S), int32 where onnxruntime wants it.

    Every row writes at T (one cache layout for the batch); the op is causal by itself, so the bias
    only masks padding (−inf). A query at a padded position still sees itself: no row is fully masked,
    so no NaN enters the cache there (it would spread to every later score, since NaN − inf is NaN)."""

    def forward(self, attention_mask, input_ids):
        b, s, total = attention_mask.shape[0], input_ids.shape[1], attention_mask.shape[1]
        key_pos = torch.arange(total, device=attention_mask.device)
        query_pos = torch.arange(s, device=attention_mask.device) + (total - s)
        allowed = attention_mask.bool()[:, None, None, :] | (key_pos[None, :] == query_pos[:, None])[None, None]
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, float("-inf"))
        rows = attention_mask.new_zeros(b, dtype=torch.int32)
        return bias, rows + (total - 1), attention_mask.new_zeros((), dtype=torch.int32) + total, rows + s


def use_group_query_attention(step: fx.GraphModule) -> dict[int, str]:
    """In an in-place baseline program (``to_in_place`` of ``baseline.kv_step_program``), run every
    site that ``GroupQueryAttention`` can express as ``gqa_op.group_query_attention``. Mutates
    ``step``; returns {site index: why not} for the sites left on masked SDPA."""
    graph = step.graph
    mask = next((n for n in graph.nodes if n.op == "call_module" and n.target == "cache_mask_in_place"), None)
    if mask is None:
        raise ValueError("use_group_query_attention needs an in-place step program: call to_in_place(step) first")
    attention_mask, input_ids = mask.args[:2]
    refused: dict[int, str] = {}
    inputs = None
    for n in list(graph.nodes):
        if n.op != "call_module" or not n.target.startswith(f"{MODULES}."):
            continue
        module = step.get_submodule(n.target)
        if not isinstance(module, KVCacheAttention):
            raise TypeError(f"{n.target} is a {type(module).__name__}: only the unconverted baseline's "
                            "KVCacheAttention sites can run as GroupQueryAttention")
        reason = module.plan.group_query_attention_refusal()
        if reason is not None:
            refused[module.plan.index] = reason
            continue
        if inputs is None:
            step.add_submodule("cache_inputs_gqa", GroupQueryCacheInputs())
            with graph.inserting_after(mask):
                inputs = graph.call_module("cache_inputs_gqa", (attention_mask, input_ids))
        module.op = "group_query_attention"
        query, key, value, _, past_key, past_value, _ = n.args      # (..., mask, *buffers, write_index)
        n.args = (query, key, value, inputs, past_key, past_value)
    G.eliminate_dead_code(graph)          # the [B, 1, S, T_max] mask, when no site reads it any more
    graph.lint()
    step.recompile()
    return refused


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
    mask_node.replace_all_uses_with(mask)
    graph.erase_node(mask_node)
    for n in graph.nodes:
        if n.op == "call_module" and n.target.startswith(f"{MODULES}."):
            module = step.get_submodule(n.target)
            if isinstance(module, (LatentAttention, KVCacheAttention)):
                module.cache_update = "in_place"
                n.args = (*n.args, write_index)
    graph.lint()
    step.recompile()
    return step


def rewrite(gm: fx.GraphModule, sites: list[AttentionSite], modules: dict[int, LatentAttention | KVCacheAttention],
            root: torch.nn.Module, *, with_cache: bool) -> tuple[fx.GraphModule, list[CacheTensor]]:
    """A new GraphModule (owned by ``root``, which must hold ``mla.{i}``, ``cache_mask`` and the
    model's parameters under the captured names) with every site in ``modules`` replaced."""
    graph, mapping = G.clone_graph(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    cache: list[CacheTensor] = []
    cache_nodes: dict[tuple[int, str], fx.Node] = {}
    mask_node = None
    if with_cache:
        with graph.inserting_after(placeholders[-1]):
            attention_mask = graph.placeholder("attention_mask")
        last = attention_mask
        for site in sites:
            if site.index not in modules:
                continue
            for kind in modules[site.index].plan.cache_kinds:
                with graph.inserting_after(last):
                    last = graph.placeholder(f"past_{site.index}_{kind}")
                cache_nodes[(site.index, kind)] = last
                cache.append(CacheTensor(f"past_key_values.{site.index}.{kind}", site.index, kind))
        with graph.inserting_after(last):
            mask_node = graph.call_module("cache_mask", (attention_mask, placeholders[0]))

    presents: list[fx.Node] = []
    for site in sites:
        if site.index not in modules:
            continue
        module = modules[site.index]
        m = lambda n: mapping[n]  # noqa: E731
        core_out = m(site.core.output)
        with graph.inserting_before(core_out):
            mask = mask_node if with_cache else (m(site.core.mask) if site.core.mask is not None else None)
            if isinstance(module, KVCacheAttention):     # the baseline: the site's own rotated k and v
                args = (m(site.core.query), m(site.key_head), m(site.value_head), mask)
            else:
                key_rope = None
                if module.rope_key is not None:
                    full = graph.call_module(f"{MODULES}.{site.index}.rope_key", (m(site.hidden),))
                    copied = G.copy_region(graph, [m(n) for n in site.key_rope_nodes], {m(site.key_raw): full})
                    key_rope = copied[m(site.key_head)]
                args = (m(site.hidden), m(site.query_raw), m(site.core.query), key_rope, mask)
            kinds = module.plan.cache_kinds if with_cache else []
            args += tuple(cache_nodes[(site.index, kind)] for kind in kinds)
            call = graph.call_module(f"{MODULES}.{site.index}", args)
            if with_cache:
                out = graph.call_function(operator.getitem, (call, 0))
                presents += [graph.call_function(operator.getitem, (call, 1 + k)) for k in range(len(kinds))]
            else:
                out = call
        core_out.replace_all_uses_with(out)
    logits = output.args[0]
    while isinstance(logits, (tuple, list)) and len(logits) == 1:   # export's pytree output spec
        logits = logits[0]
    output.args = ((logits, *presents),) if with_cache else (logits,)
    staging = fx.GraphModule(root, graph)          # dead-code elimination needs an owning module
    G.eliminate_dead_code(staging.graph)
    staging.graph.lint()
    final_graph, _ = G.clone_graph(staging.graph)   # rebuilt so unused weights are not carried
    return fx.GraphModule(root, final_graph), cache
