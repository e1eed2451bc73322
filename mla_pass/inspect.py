"""Read-only views of a model's attention: the sites the pass finds and their cache sizes."""
from __future__ import annotations

import torch

from .frontend.sites import SiteReport, kv_bytes_per_token
from .model import MLAModel


def inspect_model(model: torch.nn.Module) -> list[SiteReport]:
    """One row per attention site (refused sites carry their reason in ``note``)."""
    from .frontend.capture import capture
    from .frontend.sites import find_sites, refusal_row, report_row

    if isinstance(model, MLAModel):
        return model.report
    sites, errors = find_sites(capture(model))
    rows = [report_row(s, None) for s in sites]
    rows += [refusal_row(e) for e in errors]
    return rows


def kv_cache_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """KV-cache bytes per token over all layers: the original K and V for an unconverted model,
    the latent + rope keys for a converted one."""
    if isinstance(model, MLAModel):
        return model.kv_cache_bytes_per_token(dtype)
    return kv_bytes_per_token(inspect_model(model), dtype, original=True)


def format_table(rows: list[SiteReport], dtype: torch.dtype = torch.float16) -> str:
    """One line per site; cache sizes in bytes per token at ``dtype`` (named in the header)."""
    tag = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    head = ["layer", "heads", "kv", "head_dim", "rope", "pairs", "gqa", "bias", "fused", f"KV B/tok ({tag})",
            "rope slots", "latent", f"MLA B/tok ({tag})", "note"]
    body = [[r.layer, r.n_heads, r.n_kv_heads, r.head_dim, r.rope_layout, r.rotary_pairs, r.gqa_form,
             "yes" if r.qkv_bias else "no", "yes" if r.fused_qkv else "no",
             kv_bytes_per_token([r], dtype, original=True),
             "-" if r.rope_slots is None else f"{r.rope_slots} {'mixed' if r.rope_mixed else 'per kv head'}",
             "-" if r.latent_dim is None else r.latent_dim,
             "-" if r.converted_values_per_token is None else kv_bytes_per_token([r], dtype), r.note]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
