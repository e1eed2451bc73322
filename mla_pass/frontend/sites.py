"""A captured program → its attention sites (matched and probed) and the ones refused, with reasons.

Shared by every front end: convert/load (torch.export), the unconverted baseline, and
the conversion report (mla-pass inspect)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


def kv_bytes_per_token(rows: list[SiteReport], dtype: torch.dtype = torch.float16, *, original: bool = False) -> int:
    """KV-cache bytes per token over all sites at ``dtype``: each converted site's latent + rope
    keys, or, for sites left untouched (or every site with ``original``), the full K and V."""
    size = torch.empty((), dtype=dtype).element_size()
    return size * sum(r.original_values_per_token if original or r.converted_values_per_token is None
                      else r.converted_values_per_token for r in rows)
