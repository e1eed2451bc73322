"""The public verb: ``convert(model, config, calibration=None) -> MLAModel``.

capture → match (+ probe) → calibrate (if the config needs it) → plan → initialise (SVD) →
rewrite (forward program and decode-step program). Everything that can fail on bad input
fails before any module is built; the source model is never modified.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from . import graph as G
from .calibrate import collect
from .capture import Captured, capture
from .config import MLAConfig
from .latent_attention import LatentAttention, SitePlan
from .match import AttentionSite, SiteError, build_site, find_attention_cores, kv_values_per_token
from .model import MLAModel, SiteReport
from .plan import PlanError, initialise, nope_maps, plan_site
from .probe import extract_site_weights
from .rewrite import MODULES, CacheMask, rewrite

logger = logging.getLogger(__name__)


class NoAttentionError(ValueError):
    pass


class UnsupportedAttentionError(ValueError):
    """One or more sites cannot be rewritten exactly; ``errors`` lists each with its reason."""

    def __init__(self, errors: list[SiteError]):
        self.errors = errors
        lines = "\n  ".join(str(e) for e in errors)
        super().__init__(f"{len(errors)} attention site(s) cannot be rewritten exactly:\n  {lines}\n"
                         "Pass MLAConfig(best_effort=True) to leave them untouched.")


def find_sites(captured: Captured) -> tuple[list[AttentionSite], list[SiteError]]:
    """Every attention site of a captured program, probed; and the ones refused, with reasons."""
    dependent = G.depends_on_placeholders(captured.gm)
    sites, errors = [], []
    for core in find_attention_cores(captured.gm):
        if isinstance(core, SiteError):
            errors.append(core)
            continue
        try:
            site = build_site(len(sites) + len(errors), core, captured.gm, captured.env, dependent)
            extract_site_weights(captured.gm, site, captured.env)
            sites.append(site)
        except SiteError as e:
            e.cached_values_per_token = kv_values_per_token(core, captured.env)
            errors.append(e)
    return sites, errors


def report_row(site: AttentionSite, plan: SitePlan | None, note: str = "") -> SiteReport:
    return SiteReport(
        index=site.index, layer=site.layer, n_heads=site.n_heads, n_kv_heads=site.n_kv_heads,
        head_dim=site.head_dim, rope_layout=site.rope.layout, rotary_pairs=site.rope.n_pairs,
        gqa_form=site.gqa_form, qkv_bias=site.weights.b_key is not None or site.weights.b_value is not None,
        fused_qkv=site.fused_qkv, original_values_per_token=site.n_kv_heads * (site.head_dim + site.value_dim),
        converted_values_per_token=None if plan is None else plan.cached_values_per_token, note=note)


def convert(model: nn.Module, config: MLAConfig | None = None, calibration: torch.Tensor | None = None,
            *, progress: bool = True) -> MLAModel:
    """Rewrite every attention block of ``model`` into latent attention.

    Args:
        model: a Hugging Face causal LM or any decoder ``nn.Module`` mapping ``input_ids`` to
            logits (taking ``position_ids`` too enables cached decoding). It is not modified.
        config: an ``MLAConfig``; the default (``d_kv=None, rope_freqs=None``) is exact.
        calibration: token ids ``[N, L]`` for statistics-driven choices (``2-norm`` / ``score-error``
            selection, activation-aware SVD, ``kv_budget``, ``refit``).
        progress: show progress bars for calibration.

    Example:
        >>> mla = convert(model, MLAConfig(d_kv=16, rope_freqs=4))          # doctest: +SKIP
        >>> mla.generate(ids, max_new_tokens=8)                              # doctest: +SKIP
    """
    config = config or MLAConfig()
    if not isinstance(config, MLAConfig):
        raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
    config = config.resolved(calibration is not None)
    if isinstance(model, MLAModel):
        raise ValueError("this model is already converted; convert the original model instead")
    if config.needs_calibration and calibration is None:
        raise ValueError(f"{config.calibration_reason} needs real activations: pass calibration=token_ids (e.g. a "
                         "few 512-token windows of text)")
    if calibration is not None:
        from .calibrate import as_token_batches
        calibration = as_token_batches(calibration)
    captured = capture(model)
    if calibration is not None and int(calibration.max()) >= captured.vocab_size:
        raise ValueError(f"calibration token ids must be below the vocabulary size {captured.vocab_size}")
    return build(captured, config, calibration=calibration, progress=progress)


def build(captured: Captured, config: MLAConfig, *, calibration=None, plans: dict[int, SitePlan] | None = None,
          stats=None, progress: bool = True) -> MLAModel:
    """The pipeline after capture. With ``plans`` (from a saved model) no calibration or SVD runs
    and modules are created empty, ready for ``load_state_dict``. ``stats`` (from
    ``calibrate.collect`` on the same model, with what the config needs) skips calibration, so
    that a sweep over configs calibrates once."""
    sites, errors = find_sites(captured)
    if not sites and not errors:
        raise NoAttentionError("no attention found in the captured graph (no scaled_dot_product_attention op "
                               "and no matmul→softmax→matmul pattern): nothing to convert")
    if errors and not config.best_effort:
        raise UnsupportedAttentionError(errors)
    for e in errors:
        warnings.warn(f"left untouched: {e}", stacklevel=2)
    initialise_weights = plans is None
    if plans is None:
        config = config.resolved(calibration is not None or stats is not None)
        if config.needs_calibration and stats is None:
            stats = collect(captured.gm, sites, calibration, captured.takes_positions,
                            rope_norms=config.needs_pair_norms, gram=config.needs_gram,
                            score_error=config.needs_score_error,
                            nope_moments=(config.nope_fit,) if config.needs_nope_moments else (), progress=progress)
        missing = [s.layer for s in sites if config.needs_nope_moments and s.rope.pairs
                   and config.nope_fit not in stats.sites[s.index].nope_moments]
        if missing:
            raise ValueError(f"the calibration statistics hold no nope_fit={config.nope_fit!r} moments (e.g. at "
                             f"{missing[0]}): collect them with calibrate.collect(..., nope_moments=("
                             f"{config.nope_fit!r},)), or pass calibration tokens instead")
        try:
            if config.kv_budget is not None:
                from .allocate import allocate_budget
                split = allocate_budget(sites, config, stats)
                plans = {s.index: plan_site(s, config, stats, *split[s.index]) for s in sites}
            else:
                plans = {s.index: plan_site(s, config, stats) for s in sites}
        except PlanError as e:
            raise ValueError(str(e)) from None
    elif sorted(plans) != [s.index for s in sites]:
        raise ValueError(f"saved plans cover sites {sorted(plans)} but the model has sites "
                         f"{[s.index for s in sites]}: the model does not match the checkpoint")
    modules = nn.ModuleDict()
    for site in sites:
        hidden = captured.env[site.hidden]
        module = LatentAttention(plans[site.index]).to(device=hidden.device, dtype=hidden.dtype)
        if initialise_weights:
            gram = stats.sites[site.index].gram if stats is not None and config.needs_gram else None
            initialise(module, site, gram=gram, damping=config.damping, activation_aware=config.activation_aware,
                       refit=config.refit, nope_maps=nope_maps(site, config, stats))
        modules[str(site.index)] = module
    root = captured.gm
    root.add_module(MODULES, modules)
    root.add_module("cache_mask", CacheMask())
    by_index = {s.index: modules[str(s.index)] for s in sites}
    program, _ = rewrite(captured.gm, sites, by_index, root, with_cache=False)
    step, cache = rewrite(captured.gm, sites, by_index, root, with_cache=True)
    program.add_submodule("cache_mask", root.cache_mask)
    _unshare_with_source(program)
    report = [report_row(s, plans[s.index]) for s in sites]
    report += [refusal_row(e) for e in errors]
    report.sort(key=lambda r: r.index)
    return MLAModel(program, step.graph, cache, plans, report, config, captured.takes_positions,
                    captured.vocab_size, captured.source, captured.generation)


def refusal_row(e: SiteError) -> SiteReport:
    return SiteReport(index=-1, layer=e.layer, n_heads=0, n_kv_heads=0, head_dim=0, rope_layout="?",
                      rotary_pairs=0, gqa_form="?", qkv_bias=False, fused_qkv=False,
                      original_values_per_token=e.cached_values_per_token,
                      converted_values_per_token=None, note=e.reason)


@torch.no_grad()
def _unshare_with_source(program: nn.Module) -> None:
    """Give the converted model its own copy of weights it shares with the source model, so
    training one never moves the other (tied weights stay tied)."""
    clones: dict[int, torch.Tensor] = {}
    for path, module in program.named_modules():
        if path.split(".")[0] == MODULES:
            continue
        for name, p in list(module._parameters.items()):
            if p is not None:
                key = id(p)
                if key not in clones:
                    clones[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = clones[key]
