"""A captured program → its attention sites (matched and probed) and the ones refused, with reasons.

Shared by every front end: convert/load (torch.export), the unconverted baseline, and
the conversion report (mla-pass inspect)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from .. import graph as G
from ..modules.site_plan import SitePlan
from .capture import Captured
from .match import AttentionSite, SiteError, build_site, find_attention_cores, kv_values_per_token
from .probe import extract_site_weights


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
    matched, refused = match_sites(captured.gm, captured.env, G.depends_on_placeholders(captured.gm))
    return [site for site, _ in matched], [e for e, _ in refused]


def match_sites(gm: fx.GraphModule, env: dict, dependent: set, *, probe: bool = True, cache_of=None):
    """Every attention core of ``gm`` matched into a site, in graph order, and the refusals.

    The one site finder of every front end. ``dependent``: the nodes that depend on data inputs
    (RoPE tables are found among them). ``cache_of(core)``, for front ends whose keys and values
    pass through a cache update (the compile backend under Hugging Face's ``DynamicCache``), gives
    that update's node or None (it may refuse with ``SiteError``); the site is then matched on the
    new tokens' key and value. ``probe=False`` leaves probing (weights, RoPE layout) to the caller.
    Returns ``([(site, cache node)], [(error, cache node)])``.
    """
    matched, refused = [], []
    for core in find_attention_cores(gm):
        if isinstance(core, SiteError):
            refused.append((core, None))
            continue
        cache = None
        try:
            cache = cache_of(core) if cache_of is not None else None
            target = core if cache is None else replace(core, key=cache.args[2], value=cache.args[3])
            site = build_site(len(matched) + len(refused), target, gm, env, dependent)
            if probe:
                extract_site_weights(gm, site, env)
            matched.append((site, cache))
        except SiteError as e:
            e.cached_values_per_token = kv_values_per_token(core, env)
            refused.append((e, cache))
    return matched, refused


def report_row(site: AttentionSite, plan: SitePlan | None, note: str = "") -> SiteReport:
    return SiteReport(
        index=site.index, layer=site.layer, n_heads=site.n_heads, n_kv_heads=site.n_kv_heads,
        head_dim=site.head_dim, rope_layout=site.rope.layout, rotary_pairs=site.rope.n_pairs,
        gqa_form=site.gqa_form, qkv_bias=site.weights.b_key is not None or site.weights.b_value is not None,
        fused_qkv=site.fused_qkv, original_values_per_token=site.n_kv_heads * (site.head_dim + site.value_dim),
        converted_values_per_token=None if plan is None else plan.cached_values_per_token,
        rope_slots=None if plan is None else len(plan.rope_slots), rope_mixed=bool(plan and plan.rope_mixed),
        latent_dim=None if plan is None else plan.latent_dim, note=note)


def refusal_row(e: SiteError) -> SiteReport:
    return SiteReport(index=-1, layer=e.layer, n_heads=0, n_kv_heads=0, head_dim=0, rope_layout="?",
                      rotary_pairs=0, gqa_form="?", qkv_bias=False, fused_qkv=False,
                      original_values_per_token=e.cached_values_per_token,
                      converted_values_per_token=None, note=e.reason)


@dataclass
class SiteReport:
    """One row of the conversion report (also what ``mla-pass inspect`` prints)."""
    index: int
    layer: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_layout: str
    rotary_pairs: int
    gqa_form: str
    qkv_bias: bool
    fused_qkv: bool
    original_values_per_token: int
    converted_values_per_token: int | None      # None: left untouched
    note: str = ""
    rope_slots: int | None = None               # kept rope slots (2 cached values each); None: not converted
    rope_mixed: bool = False                    # the slots mix each rotary pair across kv heads
    latent_dim: int | None = None


def kv_bytes_per_token(rows: list[SiteReport], dtype: torch.dtype = torch.float16, *, original: bool = False) -> int:
    """KV-cache bytes per token over all sites at ``dtype``: each converted site's latent + rope
    keys, or, for sites left untouched (or every site with ``original``), the full K and V."""
    size = torch.empty((), dtype=dtype).element_size()
    return size * sum(r.original_values_per_token if original or r.converted_values_per_token is None
                      else r.converted_values_per_token for r in rows)
