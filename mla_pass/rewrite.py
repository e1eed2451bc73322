"""Graph surgery: replace each matched attention core by a call to its latent attention module.

``emit_site_call`` writes the call, the one emitter behind every front end (``rewrite`` here for
``convert``/``load``, ``dynamo.graph_sites.rewrite_sites`` for the compile backend). Per site::

    key_rope_full = mla.{i}.rope_key(x)                       # only the kept slots' (mixed) key dims
    key_rope      = <copy of the model's RoPE region>(key_rope_full)
    out_BHSDv     = mla.{i}(x, query_raw, query, key_rope, mask[, *past])

``out`` replaces the core's output; the old k/v projections, repeat_kv and the core become
dead and are removed. With ``with_cache=True`` the program gains inputs ``attention_mask
[B, T+S]`` and per site ``past_latent [B, T, C]`` (+ ``past_rope_key [B, 1, T, R]`` where
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
from .frontend.match import AttentionSite
from .modules.kv_attention import KVCacheAttention
from .modules.latent_attention import LatentAttention

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


def emit_site_call(graph: fx.Graph, site: AttentionSite, module: LatentAttention, mask, past,
                   node_of=lambda n: n) -> fx.Node:
    """Insert (at the graph's insertion point) the call of ``mla.{site.index}`` that replaces the
    site's core: its rope keys through a copy of the model's own RoPE region, then the module on
    ``(x, query_raw, query, key_rope, mask, *past)``. ``node_of`` maps the site's nodes into
    ``graph`` (a cloned graph); returns the call (its output, or ``(out, *present)`` with a past)."""
    m = node_of
    name = f"{MODULES}.{site.index}"
    key_rope = None
    if module.rope_key is not None:
        full = graph.call_module(f"{name}.rope_key", (m(site.hidden),))
        copied = G.copy_region(graph, [m(n) for n in site.key_rope_nodes], {m(site.key_raw): full})
        key_rope = copied[m(site.key_head)]
    return graph.call_module(name, (m(site.hidden), m(site.query_raw), m(site.core.query), key_rope, mask, *past))


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
            kinds = module.plan.cache_kinds if with_cache else []
            past = [cache_nodes[(site.index, kind)] for kind in kinds]
            if isinstance(module, KVCacheAttention):     # the baseline: the site's own rotated k and v
                args = (m(site.core.query), m(site.key_head), m(site.value_head), mask, *past)
                call = graph.call_module(f"{MODULES}.{site.index}", args)
            else:
                call = emit_site_call(graph, site, module, mask, past, m)
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
