"""Lowering: the unconverted baseline's sites as one GroupQueryAttention op each (as onnxruntime-genai exports them)."""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import graph as G
from ..modules.kv_attention import KVCacheAttention
from ..rewrite import MODULES
from .program import LoweringSettings, StepProgram


class GroupQueryCacheInputs(torch.nn.Module):
    """attention_mask [B, T+S] (left padding) → the inputs ``ops.group_query_attention`` takes
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
    site that ``GroupQueryAttention`` can express as ``ops.group_query_attention``. Mutates
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


def lower_group_query(program: StepProgram, settings: LoweringSettings) -> int:
    """The unconverted baseline, in place: its sites as GroupQueryAttention → sites changed; the
    attention each site runs goes to ``notes["attention"]``."""
    if program.kind != "original":
        return 0
    if program.cache_update != "in_place" or not settings.group_query_attention:
        program.notes["attention"] = "ONNX Attention (masked SDPA)"
        return 0
    refused = use_group_query_attention(program.gm)
    count = len(program.plans) - len(refused)
    program.notes["attention"] = f"com.microsoft GroupQueryAttention at {count} of {len(program.plans)} sites" + \
        "".join(f"; site {i}: masked SDPA, {why}" for i, why in sorted(refused.items()))
    return count
