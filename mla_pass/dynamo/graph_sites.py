"""Match and rewrite attention sites in the aten graph of one dynamo frame (the mla backend).

Same matcher and latent attention as ``convert``; what differs is the cache. Under Hugging
Face's ``DynamicCache`` a site reads its keys and values through ``cache_append``
(``hf_cache.py``)::

    new_k_BHkvSDh, new_v_BHkvSDv = <the model's k/v projections, RoPE on k>
    keys, values = mla_pass::cache_append(stored_k, stored_v, new_k, new_v)   # → cache slots
    out_BHSDv    = core(query, [repeat_kv] keys, [repeat_kv] values, mask)

The site is matched with ``new_k``/``new_v`` as its key/value (``build_site`` then sees the
S new tokens only), and rewritten to::

    past  = unpack_slots(stored_k, stored_v)                 # latent [B,T,C], rope_key [B,1,T,2S]
    out, *present = mla.{i}(x, query_raw, query, key_rope, mask, *past)
    key_slot, value_slot = pack_slots(*present)              # replace keys/values as graph outputs

Without a cache (``use_cache=False``) the module gets an empty past and its present is
dropped. The module is always called with a past, so its causal flag never matters: where the
core was ``is_causal`` without a mask, an explicit causal mask over T+S keys is built.

Refused (and left untouched): anything ``build_site``/probing refuses, a key and a value from
different cache updates, and cache tensors read by anything but the core and the graph output.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .. import graph as G
from ..frontend.match import AttentionCore, AttentionSite, SiteError, layer_name
from ..frontend.sites import match_sites
from ..modules.latent_attention import LatentAttention
from ..ops.cache_append import CACHE_APPEND
from ..rewrite import MODULES, emit_site_call
from .hf_cache import pack_slots, slot_layout_matches, unpack_slots


@dataclass
class GraphSite:
    """One matched site of a dynamo graph; ``cache`` is its ``cache_append`` node, if any."""
    site: AttentionSite
    cache: fx.Node | None

    @property
    def stored_nodes(self) -> tuple[fx.Node, fx.Node] | None:
        return (self.cache.args[0], self.cache.args[1]) if self.cache is not None else None


def record_values(gm: fx.GraphModule, inputs) -> dict[fx.Node, object]:
    """Every node's value on the example inputs. A ``cache_append`` whose stored slots hold
    compressed tensors gets zero full-width keys/values of the same length instead: the values
    only serve shapes and probing (the k/v paths end before the cache), never results."""
    class _FullWidthCache(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is CACHE_APPEND:
                stored_k, stored_v, new_k, new_v = args
                if not slot_layout_matches(stored_k, stored_v, new_k.shape, new_v.shape):
                    t = stored_k.shape[-2]
                    stored_k = new_k.new_zeros(*new_k.shape[:2], t, new_k.shape[3])
                    stored_v = new_v.new_zeros(*new_v.shape[:2], t, new_v.shape[3])
                return target(stored_k, stored_v, new_k, new_v)
            return super().call_function(target, args, kwargs)

    # dynamo passes the SymInt inputs of dynamic graphs as SymInts: run on their hints, so that
    # running the graph on real tensors adds no guard (a guard would specialise the graph)
    hinted = (_hint(x) if isinstance(x, torch.SymInt) else x for x in inputs)
    return G.record_values(gm, *hinted, interpreter=_FullWidthCache)


def _hint(x: torch.SymInt) -> int:
    from torch.fx.experimental import symbolic_shapes
    hint = getattr(symbolic_shapes, "optimization_hint", None) or getattr(symbolic_shapes, "hint_int")
    return int(hint(x))


_POSITION_SOURCES = {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step}


def data_dependent(gm: fx.GraphModule, data_placeholders: set[fx.Node]) -> set[fx.Node]:
    """Nodes whose value depends on a data input (tokens, positions, cache), not on weights
    only. Positions made inside the graph (``arange``: Hugging Face's ``cache_position`` when
    no ``position_ids`` are passed) count as data, so RoPE tables built from them are found."""
    dep: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n in data_placeholders or n.target in _POSITION_SOURCES or any(p in dep for p in n.all_input_nodes):
            dep.add(n)
    return dep


def find_graph_sites(gm: fx.GraphModule, env: dict, dependent: set[fx.Node]
                     ) -> tuple[list[GraphSite], list[SiteError]]:
    """Matched sites (not yet probed: the backend probes only what it cannot reuse) and refusals,
    by the same site finder as ``convert`` (``frontend.sites.match_sites``), through the cache."""
    matched, refused = match_sites(gm, env, dependent, probe=False, cache_of=_cache_of)
    for error, cache in refused:
        if cache is not None:
            refuse_if_compressed(cache, error.reason, env)
    return [GraphSite(site, cache) for site, cache in matched], [e for e, _ in refused]


def refuse_if_compressed(cache: fx.Node, reason: str, env: dict) -> None:
    """A site left untouched must not read compressed slots (an earlier graph compressed this
    layer's cache): its ``cat`` would mix latent and full K/V. That is an error, never a guess."""
    stored_k, stored_v, new_k, new_v = (env[a] for a in cache.args[:4])
    if not slot_layout_matches(stored_k, stored_v, new_k.shape, new_v.shape):
        where = layer_name(cache)
        raise RuntimeError(f"attention at {where}: its cache holds compressed tensors from an earlier compiled "
                           f"call, but this graph's site cannot be rewritten ({reason}); start generation from a "
                           "fresh cache, or compile with other options")


def _cache_of(core: AttentionCore) -> fx.Node | None:
    """The ``cache_append`` both the core's key and value come from (through views / repeat_kv)."""
    sources = []
    for fed, slot in ((core.key, 0), (core.value, 1)):
        node = fed
        while G.is_layout_op(node):
            node = node.args[0]
        is_slot = G.is_getitem(node) and getattr(node.args[0], "target", None) is CACHE_APPEND
        if not is_slot and node.target is torch.ops.aten.cat.default and len(node.args[0]) == 2 \
                and (node.args[1] if len(node.args) > 1 else 0) in (-2, 2):
            raise SiteError(layer_name(core.anchor), node.name, "its cache update is a plain torch.cat, not a "
                            "DynamicLayer (e.g. a sliding-window cache layer): only DynamicLayer caches are "
                            "compressed")
        sources.append((node.args[0], node.args[1] == slot) if is_slot else (None, True))
    (k_cache, k_ok), (v_cache, v_ok) = sources
    if k_cache is None and v_cache is None:
        return None
    if k_cache is not v_cache or not (k_ok and v_ok):
        raise SiteError(layer_name(core.anchor), core.anchor.name,
                        "key and value do not come from the same cache update (keys, values)")
    _check_cache_only_feeds_core(k_cache, core)
    return k_cache


def _check_cache_only_feeds_core(cache: fx.Node, core: AttentionCore) -> None:
    """The cache's full K/V may feed only the core (and leave as graph outputs): those are the
    uses the rewrite replaces."""
    feeding = G.ancestors(core.output) | {core.output}
    stack, seen = list(cache.users), set()
    while stack:
        n = stack.pop()
        if n in seen or n.op == "output" or n is core.output:
            continue
        seen.add(n)
        if n not in feeding:
            raise SiteError(layer_name(core.anchor), n.name, "the cached keys/values are read by something "
                            "other than the attention (the rewrite would have to keep full K/V)")
        stack.extend(n.users)


def check_stored_layout(gs: GraphSite, plan, env) -> None:
    """Slots from an earlier call must hold this plan's compressed layout. Full K/V there (the
    cache was filled outside the mla backend, e.g. by an eager prefill) leaves the site
    untouched; anything else is an error. (Compressed and full layouts coincide only for one
    kv head with latent width == value dim and every rotated dim kept; that reads as compressed.)"""
    if gs.cache is None:
        return
    stored_k, stored_v, new_k, new_v = (env[a] for a in gs.cache.args[:4])
    if stored_k.dim() < 2:
        return
    packed = plan.latent_dim + plan.key_scale_groups
    shape = lambda t: (t.dim(), t.shape[1], t.shape[-1])  # noqa: E731
    if plan.rope_width:
        ok = shape(stored_k) == (4, 1, plan.rope_width) and shape(stored_v) == (4, 1, packed)
    else:
        ok = shape(stored_k) == (4, 1, packed)
    if ok:
        return
    if slot_layout_matches(stored_k, stored_v, new_k.shape, new_v.shape):
        raise SiteError(gs.site.layer, gs.cache.name, "the cache already holds full K/V for this layer (filled "
                        "outside the mla backend)")
    raise ValueError(f"attention at {gs.site.layer}: the cache holds tensors of shape {tuple(stored_k.shape)} / "
                     f"{tuple(stored_v.shape)}, neither full K/V nor this conversion's compressed layout (was it "
                     "filled with other options?); start generation from a fresh cache")


def causal_mask(query_BHSD: torch.Tensor, past_latent_BTC: torch.Tensor) -> torch.Tensor:
    """bool [S, T+S]: query i sees the T cached keys and new keys up to its own position."""
    s, t = query_BHSD.shape[2], past_latent_BTC.shape[1]
    return torch.ones(s, t + s, dtype=torch.bool, device=query_BHSD.device).tril(t)


def rewrite_sites(gm: fx.GraphModule, sites: list[GraphSite], modules: dict[int, LatentAttention]) -> None:
    """Replace each site's core by its latent attention module, in place; cache slots carry
    the compressed present."""
    gm.add_submodule(MODULES, nn.ModuleDict({str(i): m for i, m in modules.items()}))
    graph = gm.graph
    slot_for: dict[fx.Node, fx.Node] = {}
    for gs in sites:
        site, module = gs.site, modules[gs.site.index]
        plan = module.plan
        core_out = site.core.output
        with graph.inserting_before(core_out):
            stored = gs.stored_nodes or (None, None)
            past_all = graph.call_function(unpack_slots, (*stored, site.hidden, plan.latent_dim, plan.rope_width,
                                                          plan.key_scale_groups))
            past = [graph.call_function(operator.getitem, (past_all, k)) for k in range(len(plan.cache_kinds))]
            mask = site.core.mask
            if mask is None and site.core.is_causal:
                mask = graph.call_function(causal_mask, (site.core.query, past[0]))
            call = emit_site_call(graph, site, module, mask, past)
            out = graph.call_function(operator.getitem, (call, 0))
            if gs.cache is not None:
                present = [graph.call_function(operator.getitem, (call, 1 + k)) for k in range(len(past))]
                slots = graph.call_function(pack_slots, tuple(present), {"rope_width": plan.rope_width,
                                                                         "scale_groups": plan.key_scale_groups})
                for user in list(gs.cache.users):
                    slot_for[user] = graph.call_function(operator.getitem, (slots, user.args[1]))
        core_out.replace_all_uses_with(out)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = fx.node.map_arg(output.args, lambda n: slot_for.get(n, n))
    G.eliminate_dead_code(graph)
    alive = set(graph.nodes)
    leftover = [gs.cache.name for gs in sites if gs.cache is not None and gs.cache in alive]
    if leftover:
        raise RuntimeError(f"internal error: cache updates {leftover} still read full K/V after the rewrite")
    graph.lint()
    gm.recompile()
