"""The public verbs: ``convert(model, config, calibration=None) -> MLAModel`` and ``load(path)``.

capture → sites (match + probe) → calibrate (if the config needs it) → plans → modules
(initialised by SVD, or empty for a saved model's weights) → rewrite (forward program and
decode-step program). ``load`` runs the same path from a checkpoint's saved plans. Everything
that can fail on bad input fails before any module is built; the source model is never modified.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
from torch import nn

from .config import MLAConfig
from .frontend.capture import Captured, capture, non_finite
from .frontend.sites import NoAttentionError, UnsupportedAttentionError, find_sites, refusal_row, report_row
from .model import MLAModel
from .modules.site_plan import SitePlan
from .persist import WEIGHTS_FILE, CheckpointError, read_checkpoint, rebuild_source
from .plan.build import plan_sites, site_module
from .plan.calibrate import collect
from .rewrite import MODULES, CacheMask, rewrite

logger = logging.getLogger(__name__)


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
    if isinstance(model, MLAModel):
        raise ValueError("this model is already converted; convert the original model instead")
    if config.needs_calibration and calibration is None:
        raise ValueError(f"{config.calibration_reason} needs real activations: pass calibration=token_ids (e.g. a "
                         "few 512-token windows of text)")
    if calibration is not None:
        from .plan.calibrate import as_token_batches
        calibration = as_token_batches(calibration)
    captured = capture(model)
    if calibration is not None and int(calibration.max()) >= captured.vocab_size:
        raise ValueError(f"calibration token ids must be below the vocabulary size {captured.vocab_size}")
    return build(captured, config, calibration=calibration, progress=progress)


def build(captured: Captured, config: MLAConfig, *, calibration=None, plans: dict[int, SitePlan] | None = None,
          stats=None, progress: bool = True) -> MLAModel:
    """The pipeline after capture. With ``plans`` (from a saved model) no calibration or SVD runs
    and modules are created empty, ready for ``load_state_dict``. ``stats`` (from
    ``plan.calibrate.collect`` on the same model, with what the config needs) skips calibration, so
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
        plans = plan_sites(sites, config, stats)
    elif sorted(plans) != [s.index for s in sites]:
        raise ValueError(f"saved plans cover sites {sorted(plans)} but the model has sites "
                         f"{[s.index for s in sites]}: the model does not match the checkpoint")
    modules = nn.ModuleDict()
    for site in sites:
        modules[str(site.index)] = site_module(site, plans[site.index], captured.env[site.hidden],
                                               config if initialise_weights else None, stats)
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


def load(path: str | os.PathLike, model: torch.nn.Module | None = None) -> MLAModel:
    """Load a model written by ``MLAModel.save``.

    Args:
        path: the folder holding ``mla_config.json`` and ``model.safetensors``.
        model: for models that are not Hugging Face models, a freshly built instance of the
            source architecture (its weights are ignored). Hugging Face models are rebuilt from
            the saved config.

    Example:
        >>> mla.save("out/smollm2-mla"); mla2 = load("out/smollm2-mla")   # doctest: +SKIP
    """
    checkpoint = read_checkpoint(path)
    if model is None:
        model = rebuild_source(checkpoint.meta["source"])
    tensors, weights = checkpoint.tensors, checkpoint.path / WEIGHTS_FILE
    with torch.device("cpu"):
        mla = build(capture(model), checkpoint.config, plans=checkpoint.plans, progress=False)
    expected = mla.program.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"{weights} does not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {bad_shape[:5]}; the checkpoint and the source architecture disagree")
    bad = non_finite(tensors.items())
    if bad:
        raise CheckpointError(f"{weights} holds NaN or inf in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: "
                              "the model it was saved from had diverged; re-convert or use an earlier checkpoint")
    mla.program.load_state_dict(tensors, strict=True)
    mla.generation = checkpoint.meta.get("generation", mla.generation)
    return mla
