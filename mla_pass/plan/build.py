"""Matched sites + a resolved config → plans → initialised latent attention modules.

The part of the pass every front end shares: ``convert``/``load`` (``pipeline.build``) and the
compile backend (``dynamo.backend``) build their modules here, so the same site and config give
the same module whichever way the model was captured.
"""
from __future__ import annotations

import torch

from ..config import MLAConfig
from ..frontend.match import AttentionSite
from ..modules.latent_attention import LatentAttention
from ..modules.site_plan import SitePlan
from .choose import PlanError, nope_maps, plan_site, rope_mixing
from .initialise import initialise


def plan_sites(sites: list[AttentionSite], config: MLAConfig, stats=None) -> dict[int, SitePlan]:
    """Each site's plan under ``config`` (resolved: ``MLAConfig.resolved``); a ``kv_budget`` is
    split between the sites first. Statistics (``calibrate.collect``) are needed where the config
    says so. A plan that cannot be made is a ``ValueError`` saying which setting to change."""
    try:
        if config.kv_budget is not None:
            from .allocate import allocate_budget
            split = allocate_budget(sites, config, stats)
            return {s.index: plan_site(s, config, stats, *split[s.index]) for s in sites}
        return {s.index: plan_site(s, config, stats) for s in sites}
    except PlanError as e:
        raise ValueError(str(e)) from None


def site_module(site: AttentionSite, plan: SitePlan, like: torch.Tensor, config: MLAConfig | None = None,
                stats=None) -> LatentAttention:
    """The site's module on ``like``'s device and dtype: initialised from the site's pretrained
    weights under ``config`` (SVD, activation-aware with ``stats``' Gram matrices), or, with no
    config, empty (for ``load_state_dict`` from a saved conversion)."""
    module = LatentAttention(plan).to(device=like.device, dtype=like.dtype)
    if config is not None:
        site_stats = stats.sites[site.index] if stats is not None else None
        gram = site_stats.gram if site_stats is not None and config.needs_gram else None
        initialise(module, site, gram=gram, damping=config.damping, activation_aware=config.activation_aware,
                   refit=config.refit, nope_maps=nope_maps(site, config, stats),
                   rope_mix=rope_mixing(site, stats, plan.rope_mixed))
    return module
