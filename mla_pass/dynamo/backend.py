"""``torch.compile(model, backend="mla", options={...})``: the pass as a PyTorch 2 compiler backend.

Registered by the ``torch_dynamo_backends`` entry point (``pyproject.toml``), so the line works
right after ``pip install`` with no ``import mla_pass``; this module must not also call
``register_backend`` (dynamo would raise "duplicate name"). Importing it installs the
``DynamicLayer.update`` routing of ``hf_cache.py`` (active only while dynamo traces).

What happens to each graph dynamo hands over (parameters arrive as placeholders, with the
real tensors in ``example_inputs``):

1. lower: ``make_fx(pre_dispatch=True)`` retraces dynamo's torch-level graph to aten ops under
   dynamo's own fake mode, so the symbolic shapes of dynamic graphs (decode with a growing
   cache) survive; pre-dispatch keeps ``linear`` and ``scaled_dot_product_attention`` whole,
   which is the level the matcher reads (the same as ``torch.export``'s). ``torch.export`` of
   the dynamo graph would need hand-made ``dynamic_shapes`` for every input, SymInt inputs
   included, and would specialise what it cannot express.
2. record every node's value on the example inputs (shapes and probing need real values),
3. match with ``match.build_site`` (through the cache update, ``graph_sites.py``), probe,
   plan and initialise with the same functions ``convert`` uses (``plan/build.py``), then
   rewrite the sites in place with the same site-call emitter (``rewrite.emit_site_call``);
4. hand the result to inductor (``compile_fx``, default) or run it as it is (``inner="eager"``).

Which conversion: by default the weight-only one the options describe (``high``/``low``/
``uniform`` pairs, weight-only SVD). ``options={"calibration": token_ids, ...}`` runs the calibrated
conversion ``mla_pass.convert(model, config, calibration=token_ids)`` makes (once per model, config
and tokens); ``options={"checkpoint": DIR}`` runs a saved one (``mla-pass convert`` / ``recover``,
``mla.save``), trained weights included. Both are checked against the graph (``conversion.py``):
a conversion of another model is an error, never a silent mix.

Reuse across graphs: dynamo compiles one model several times (prefill, first decode step with
static shapes, decode with a dynamic cache length; again after a shape change). The latent
module of a site (its SVD and rope selection) is cached by the identity of the weight tensors on
the site's k/v paths and the config; when their ``_version`` moved (in-place updates), the k/v
weights are probed again and the module is kept if what it was built from is unchanged (so
fine-tuning through the compiled model keeps its trained latent weights across recompiles), and
rebuilt otherwise. ``latent_modules(model)`` returns the modules built from a model's weights
(what an optimizer must train: the old k/v projections are no longer read).

Sites the rewrite cannot handle exactly stay as they are, with one warning naming the reason; a
graph with no attention runs unchanged, with one warning. Counters (``torch._dynamo.utils.
counters["mla"]``): graphs, sites_rewritten, sites_refused, factorisations, reused.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from ..config import MLAConfig
from . import hf_cache

logger = logging.getLogger(__name__)

hf_cache.install()

INNERS = ("inductor", "eager")
BACKEND_ONLY_OPTIONS = {
    "inner": f"one of {INNERS}: what runs the rewritten graph (default 'inductor')",
    "checkpoint": "a folder written by mla-pass convert / recover or MLAModel.save: run that conversion "
                  "(its plans and trained weights)",
    "calibration": "token ids [N, L] (e.g. a few 512-token windows of text): the calibrated conversion that "
                   "mla_pass.convert(model, config, calibration=ids) makes",
}


@dataclass(frozen=True)
class BackendOptions:
    config: MLAConfig                             # as requested (see ``resolved``)
    inner: str = "inductor"
    checkpoint: Path | None = None
    calibration: torch.Tensor | None = field(default=None, compare=False)

    @property
    def resolved(self) -> MLAConfig:
        """The config with its automatic choices made (calibrated ones with ``calibration``)."""
        return self.config.resolved(self.calibration is not None)


def parse_options(options: dict | None) -> BackendOptions:
    """``options`` of ``torch.compile(..., backend="mla")``: MLAConfig fields plus ``inner``,
    ``checkpoint`` or ``calibration`` (``BACKEND_ONLY_OPTIONS``).

    ``best_effort`` defaults to True here (sites that cannot be rewritten exactly stay
    untouched, with a warning); False makes such a site a compile error.
    """
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise TypeError(f"backend='mla' options must be a dict, got {type(options).__name__}")
    config_fields = [f.name for f in fields(MLAConfig)]
    valid = sorted(config_fields + list(BACKEND_ONLY_OPTIONS))
    unknown = sorted(str(k) for k in options if k not in valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for torch.compile(backend='mla'); valid options: {valid} "
                         f"(MLAConfig fields, and inner: {BACKEND_ONLY_OPTIONS['inner']})")
    checkpoint, calibration = options.get("checkpoint"), options.get("calibration")
    if checkpoint is not None:
        given = sorted(k for k in options if k in config_fields and k != "best_effort")
        if given or calibration is not None:
            raise ValueError(f"options checkpoint and {given or ['calibration']} do not go together: the checkpoint "
                             "fixes the conversion (its config, plans and weights); drop the other options")
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"option checkpoint must be a folder path, got {type(checkpoint).__name__}")
        from ..persist import CONFIG_FILE
        checkpoint = Path(checkpoint)
        if not (checkpoint / CONFIG_FILE).is_file():
            raise ValueError(f"option checkpoint={str(checkpoint)!r} is not a folder written by mla-pass convert / "
                             f"recover or MLAModel.save (no {CONFIG_FILE} in it)")
    if calibration is not None:
        from ..plan.calibrate import as_token_batches
        calibration = as_token_batches(calibration)
    config = MLAConfig(**{"best_effort": True, **{k: options[k] for k in config_fields if k in options}})
    if config.needs_calibration and calibration is None:
        raise ValueError(f"{config.calibration_reason} needs calibration tokens: pass them as "
                         "options={'calibration': token_ids, ...}, or use rope_strategy='high'|'low'|'uniform' "
                         "without activation_aware (and nope_fit='none')")
    inner = options.get("inner", "inductor")
    if inner not in INNERS:
        raise ValueError(f"option inner must be one of {INNERS}, got {inner!r}")
    return BackendOptions(config=config, inner=inner, checkpoint=checkpoint, calibration=calibration)


def mla_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None, mode: str | None = None):
    """The dynamo backend: rewrite every attention site of ``gm`` into latent attention."""
    if mode is not None:
        raise ValueError(f"torch.compile(backend='mla') takes no mode (got {mode!r}); pass options={{...}}")
    opts = parse_options(options)
    from torch._dynamo.utils import counters
    counters["mla"]["graphs"] += 1
    rewritten = _rewrite(gm, example_inputs, opts)
    target = gm if rewritten is None else rewritten
    if opts.inner == "eager":
        return target.forward
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(target, example_inputs)


# --------------------------------------------------------------------------------------------
# one graph
# --------------------------------------------------------------------------------------------
def _rewrite(gm: fx.GraphModule, example_inputs: list, opts: BackendOptions) -> fx.GraphModule | None:
    """The rewritten aten graph, or None when nothing in ``gm`` is rewritten."""
    from torch._dynamo.utils import counters

    from ..frontend.match import SiteError, find_attention_cores
    from ..frontend.sites import UnsupportedAttentionError
    from .conversion import weight_names
    from .graph_sites import (
        check_stored_layout,
        data_dependent,
        find_graph_sites,
        record_values,
        refuse_if_compressed,
        rewrite_sites,
    )

    try:
        gm_aten = lower_to_aten(gm, example_inputs)
        has_attention = bool(find_attention_cores(gm_aten))
        env = record_values(gm_aten, example_inputs) if has_attention else None
    except Exception as e:       # a graph the pass cannot even read runs unchanged, loudly
        if _reads_compressed_cache(gm):
            raise
        _warn_once(f"mla backend: could not lower this graph to aten ops ({type(e).__name__}: {e}); it runs "
                   "unchanged")
        return None
    if not has_attention:
        _warn_once("mla backend: no attention found in this graph (no scaled_dot_product_attention op and no "
                   "matmul→softmax→matmul pattern); it runs unchanged")
        return None
    placeholders = [n for n in gm_aten.graph.nodes if n.op == "placeholder"]
    is_weight = _weight_flags(gm, example_inputs)
    data = {n for n, w in zip(placeholders, is_weight) if not w}
    sites, errors = find_graph_sites(gm_aten, env, data_dependent(gm_aten, data))
    conversion = _conversion(gm, opts)
    if conversion is None:
        source, build = opts.resolved, _factorised(opts.resolved)
    else:
        source, build = conversion.label, conversion.module_for
    modules, kept = {}, []
    for gs in sites:
        try:
            module = _module_for(gs.site, gm_aten, env, data, source, lambda site: build(site, env))
            check_stored_layout(gs, module.plan, env)
        except SiteError as e:
            if gs.cache is not None:
                refuse_if_compressed(gs.cache, e.reason, env)
            errors.append(e)
            continue
        modules[gs.site.index] = module
        kept.append(gs)
    if errors and not opts.config.best_effort:
        raise UnsupportedAttentionError(errors)
    for e in errors:
        _warn_once(f"mla backend left untouched: {e}", key=(e.layer, e.reason))
    counters["mla"]["sites_refused"] += len(errors)
    if not kept:
        return None
    rewrite_sites(gm_aten, kept, modules)
    if conversion is not None:
        conversion.check_weights(gm_aten, weight_names(gm), example_inputs)
    counters["mla"]["sites_rewritten"] += len(kept)
    return gm_aten


def _conversion(gm: fx.GraphModule, opts: BackendOptions):
    """The saved or calibrated conversion the options ask for, or None (factorise from scratch)."""
    from .conversion import from_calibration, from_checkpoint, traced_model

    if opts.checkpoint is not None:
        return from_checkpoint(opts.checkpoint)
    if opts.calibration is not None:
        return from_calibration(traced_model(gm), opts.config, opts.calibration)
    return None


def lower_to_aten(gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
    """dynamo's graph → pre-dispatch aten graph with the same inputs and outputs (symbolic
    shapes kept: tensors are faked with dynamo's symbolic contexts, SymInt inputs reuse its
    symbols)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    ctx = torch._guards.TracingContext.try_get()
    fake_mode = ctx.fake_mode if ctx is not None and ctx.fake_mode is not None else FakeTensorMode()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = []
    with fake_mode:
        for node, x in zip(placeholders, example_inputs):
            if isinstance(x, torch.Tensor):
                sym = ctx.tensor_to_context[x] if ctx is not None and x in ctx.tensor_to_context else None
                fakes.append(fake_mode.from_tensor(x, symbolic_context=sym, source=sym.tensor_source if sym else None))
            else:
                fakes.append(node.meta.get("example_value", x))
    with fake_mode, fx.traceback.preserve_node_meta():
        return make_fx(fx.Interpreter(gm).run, pre_dispatch=True, record_module_stack=True)(*fakes)


def _reads_compressed_cache(gm: fx.GraphModule) -> bool:
    """True when a cache update of ``gm`` reads slots holding compressed tensors (then running
    it unchanged would mix latent and full K/V)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.mla_pass.cache_append, hf_cache.CACHE_APPEND):
            vals = [a.meta.get("example_value") if isinstance(a, fx.Node) else None for a in n.args[:4]]
            if all(isinstance(v, torch.Tensor) for v in vals) and \
                    not hf_cache.slot_layout_matches(vals[0], vals[1], vals[2].shape, vals[3].shape):
                return True
    return False


def _weight_flags(gm: fx.GraphModule, example_inputs: list) -> list[bool]:
    """Which inputs are model weights (parameters and buffers), by dynamo's source of each."""
    flags = []
    for node, x in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = source.name if source is not None else ""
        flags.append(isinstance(x, nn.Parameter) or "._parameters[" in name or "._buffers[" in name)
    return flags


# --------------------------------------------------------------------------------------------
# latent modules, computed once per set of weights
# --------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    refs: tuple[weakref.ref, ...]
    versions: tuple[int, ...]
    digest: str
    module: nn.Module

    def alive(self, tensors) -> bool:
        return all(r() is t for r, t in zip(self.refs, tensors))


_MODULES: dict[tuple, _Entry] = {}


def _module_for(site, gm, env, data: set, source, build):
    """The site's LatentAttention, kept per set of weights on the site's k/v paths and per
    ``source`` (the config, or a conversion's label): reused when built from the same weights
    (unprobed while their versions are unchanged: a one-token decode step cannot probe RoPE), else
    probed and made by ``build(site)``."""
    from torch._dynamo.utils import counters

    from ..frontend.probe import extract_site_weights

    tensors = _site_weights(site, env, data)
    key = (source, tuple(id(t) for t in tensors))
    entry = _MODULES.get(key)
    if entry is not None and not entry.alive(tensors):     # an id reused after its tensor died
        del _MODULES[key]
        entry = None
    versions = tuple(t._version for t in tensors)
    if entry is not None and entry.versions == versions and _fits(entry.module.plan, site, env):
        counters["mla"]["reused"] += 1
        return entry.module
    extract_site_weights(gm, site, env)
    digest = _digest(site)
    if entry is not None and entry.digest == digest and _fits(entry.module.plan, site, env):
        entry.versions = versions
        counters["mla"]["reused"] += 1
        return entry.module
    module = build(site)
    _prune()
    _MODULES[key] = _Entry(tuple(weakref.ref(t) for t in tensors), versions, digest, module)
    return module


def _factorised(config: MLAConfig):
    """``build`` for ``_module_for``: plan and initialise the site from its weights, like ``convert``."""
    from torch._dynamo.utils import counters

    from ..plan.build import plan_sites, site_module

    def build(site, env):
        counters["mla"]["factorisations"] += 1
        return site_module(site, plan_sites([site], config)[site.index], env[site.hidden], config)
    return build


def _site_weights(site, env, data: set) -> list[torch.Tensor]:
    """The weight tensors on the site's k/v paths (placeholders that are not data, constants)."""
    from .. import graph as G

    nodes = G.region(site.hidden, site.key_head) + G.region(site.hidden, site.value_head)
    leaves = [n for n in G.region_externals(site.hidden, nodes)
              if n.op in ("placeholder", "get_attr") and n not in data and isinstance(env.get(n), torch.Tensor)]
    return [env[n] for n in leaves]


def _fits(plan, site, env) -> bool:
    return (plan.n_heads, plan.n_kv_heads, plan.head_dim, plan.value_dim, plan.hidden, plan.query_raw_layout,
            plan.key_raw_layout, plan.softcap, plan.key_norm) == \
        (site.n_heads, site.n_kv_heads, site.head_dim, site.value_dim, env[site.hidden].shape[-1],
         site.raw_layouts["query"], site.raw_layouts["key"], site.core.softcap,
         site.key_norm.group if site.key_norm else None) and abs(plan.scale - site.scale) <= 1e-12 * plan.scale


def _digest(site) -> str:
    """A hash of what a module is built from: the probed k/v weights and RoPE layout."""
    h = hashlib.sha1()
    w = site.weights
    norm = site.key_norm_weights
    for t in (w.w_key, w.b_key, w.w_value, w.b_value, getattr(norm, "full_weight", None), getattr(norm, "full_bias", None)):
        h.update(b"-" if t is None else t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(repr((site.rope.pairs, site.rope.speeds, site.kv_head_of_query)).encode())
    return h.hexdigest()


def _prune() -> None:
    for key in [k for k, e in _MODULES.items() if any(r() is None for r in e.refs)]:
        del _MODULES[key]


def latent_modules(model: nn.Module) -> nn.ModuleList:
    """The latent attention modules the backend built from ``model``'s weights (after its first
    compiled call): train their parameters, e.g.
    ``AdamW([*model.parameters(), *latent_modules(model).parameters()])``."""
    params = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    found = [e.module for e in _MODULES.values() if any(id(r()) in params for r in e.refs if r() is not None)]
    return nn.ModuleList(found)


# --------------------------------------------------------------------------------------------
# warnings: once per refused site (layer, reason) or message, until torch._dynamo.reset()
# --------------------------------------------------------------------------------------------
_WARNED: set = set()


def _warn_once(message: str, key=None) -> None:
    key = message if key is None else key
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def _reset() -> None:
    """Called by ``torch._dynamo.reset()``: warnings may be given again (the latent modules are
    kept: they may hold trained weights)."""
    _WARNED.clear()


mla_backend.reset = _reset
