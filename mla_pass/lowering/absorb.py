"""Absorb the up-projections into a step program's query and output projections (for export).

``absorb_projections(step, example_args)`` rewrites every ``LatentAttention`` call that runs the
absorbed multi-query form (``math/absorbed_mqa.py``): the model's query projection and the
output projection after the attention are measured by probing (they must be affine, checked on
a recorded run), folded with W_uk and W_uv (``math/absorption.py``) and installed on the module
as ``query_latent`` / ``rope_query`` / ``output_projection``. The query's rotated dims still go
through a copy of the model's own RoPE region, so no rotation formula is assumed. The original
projections become dead code: the program computes [H·C] queries and reads [H·C] outputs
instead of [H·Dh] and [H·Dv], and runs neither per-head up-projection.

A module in form "auto" (``LoweringSettings.prefill="decompressed"``) gets the decompressed form's
projections (``query_nope_projection``, ``value_output_projection``): the exported program then
runs prompts decompressed and one-token steps absorbed (``LatentAttention.absorbed_projections``).
Its one-token steps get the folded projections only where they read fewer weight bytes
(``folding_reads_fewer_bytes``: C below the head width); elsewhere they run the two shared
projections with W_uk / W_uv applied per head, so the program holds each weight once.

A site that does not qualify (decompressed form, softcapping, normalised keys, a query or an
output path that is not affine) is left as it was; ``absorb_projections`` says which and why.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .. import graph as G
from ..frontend.match import SiteError
from ..frontend.probe import affine_map
from ..math.absorbed_mqa import eligible
from ..math.absorption import absorbed_output, absorbed_query, decompressed_output, nope_query, rope_query
from ..modules.latent_attention import LatentAttention, RopeProjection
from .program import LoweringSettings, StepProgram


def absorb_projections(step: fx.GraphModule, example_args: tuple) -> dict[str, object]:
    """Fold every qualifying site of ``step`` in place → {"sites": n folded, "left": {layer: why}}."""
    env = G.record_values(step, *example_args)
    inputs_of = G.depends_on_placeholders(step)
    folded, left = 0, {}
    for node in list(step.graph.nodes):
        if node.op != "call_module" or not isinstance(step.get_submodule(node.target), LatentAttention):
            continue
        module = step.get_submodule(node.target)
        reason = _refusal(module)
        if reason is None:
            try:
                _absorb_site(step, node, module, env, inputs_of)
                folded += 1
                continue
            except SiteError as e:
                reason = e.reason
        left[module.plan.layer] = reason
    G.eliminate_dead_code(step.graph)
    step.graph.lint()
    step.recompile()
    return {"sites": folded, "left": left}


def _refusal(module: LatentAttention) -> str | None:
    p = module.plan
    if module.form == "decompressed":
        return "runs the decompressed form"
    if not eligible(p.softcap, p.key_norm or None, p.kv_head_of_query, p.n_kv_heads):
        return "not the multi-query form (softcapping, normalised keys or query heads out of kv-group order)"
    return None


def _absorb_site(step: fx.GraphModule, node: fx.Node, module: LatentAttention, env: dict, inputs_of: set) -> None:
    p = module.plan
    x, query_raw, query = node.args[:3]
    returns_cache = isinstance(env[node], (tuple, list))      # (out, *present)
    out = next((u for u in node.users if G.is_getitem(u) and u.args[1] == 0), None) if returns_cache else node
    if out is None:
        raise SiteError(p.layer, node.name, "its attention output is not used")
    b, s, d = env[x].shape
    heads_first = p.query_raw_layout == "BHSD"
    w_q, b_q = affine_map(step, env, x, query_raw, to_source=lambda t: t.reshape(b, s, d), layer=p.layer,
                          to_tokens=lambda t: (t.transpose(1, 2) if heads_first else t).reshape(t.shape[0], s, -1))
    w_q = w_q.reshape(p.n_heads, p.head_dim, d)
    b_q = None if b_q is None else b_q.reshape(p.n_heads, p.head_dim)
    end, w_o, b_o = _output_projection(step, out, env, inputs_of, p)

    dtype = module.down.dtype
    mix = None if module.query_nope_mix is None else module.query_nope_mix.detach().double()
    partner = getattr(module, "query_nope_partner", None)
    w_o_YHV = w_o.reshape(w_o.shape[0], p.n_heads, p.value_dim)
    b_v = None if module.value_bias is None else module.value_bias.detach().double()
    if module.form == "auto":        # prompts run the decompressed form: its projections, folded alike
        w_qn, b_qn = nope_query(w_q, b_q, module.query_nope_dims, p.scale, mix, partner)
        w_vo, b_vo = decompressed_output(w_o_YHV, b_o, b_v, module.kv_head_of_query)
        module.query_nope_projection = _linear(w_qn, b_qn, dtype)
        module.value_output_projection = _linear(w_vo, b_vo, dtype)
    if module.form == "absorbed" or folding_reads_fewer_bytes(p, d, w_o.shape[0]):
        # W_uk into the query projection, W_uv into the output projection
        w_ql, b_ql = absorbed_query(w_q, b_q, module.query_nope_dims, module.up_key.detach().double(),
                                    module.kv_head_of_query, p.scale, mix, partner)
        w_y, b_y = absorbed_output(w_o_YHV, b_o, module.up_value.detach().double(), b_v, module.kv_head_of_query)
        module.query_latent = _linear(w_ql, b_ql, dtype)
        module.output_projection = _linear(w_y, b_y, dtype)
    new_query = None
    graph = step.graph
    if p.rope_width:
        used = sorted(set(module.rope_value_dims.tolist()))            # the dims of the kept slots' pairs
        dims = torch.tensor(used, device=w_q.device).repeat(p.n_heads, 1)                     # [H, R']
        w_qr, b_qr = rope_query(w_q, b_q, dims, p.scale)
        positions = (torch.arange(p.n_heads, device=dims.device)[:, None] * p.head_dim + dims).reshape(-1)
        rope = RopeProjection(p.n_heads, p.head_dim, d, positions, p.query_raw_layout, b_qr is not None)
        module.rope_query = _loaded(rope.to(dtype), w_qr, b_qr)
        with graph.inserting_before(node):
            full = graph.call_module(f"{node.target}.rope_query", (x,))
            new_query = G.copy_region(graph, G.region(query_raw, query), {query_raw: full})[query]
    node.args = (x, None, new_query, *node.args[3:])
    end.replace_all_uses_with(out)


def folding_reads_fewer_bytes(plan, hidden: int, out_dim: int) -> bool:
    """Whether a one-token step reads fewer weights with W_uk / W_uv folded into the query and
    output projections ([H·C] each) than with them applied per head after the [H·Dh] / [H·Dv]
    ones, which the decompressed form needs anyway: folding pays when C is below the head width."""
    p = plan
    folded = p.n_heads * p.latent_dim * (hidden + out_dim)
    shared = (p.n_heads * (p.head_dim * hidden + p.value_dim * out_dim)
              + p.n_kv_heads * (p.head_dim + p.value_dim) * p.latent_dim)
    return folded < shared


def _output_projection(step, out: fx.Node, env: dict, inputs_of: set, p):
    """(end node, W [Y, H·Dv], b [Y] | None): the longest single-user chain after the attention
    output that is one affine map per token and applies a weight (the output projection, its
    layout ops and bias), ending at a [B, S, Y] value."""
    chain, n = [], out
    while len(n.users) == 1:
        user = next(iter(n.users))
        if any(a in inputs_of and isinstance(env.get(a), torch.Tensor) for a in user.all_input_nodes if a is not n):
            break                      # another activation joins here (the residual add)
        chain.append(user)
        n = user
    b, h, s, v = env[out].shape
    why = "no output projection follows the attention"
    for end in reversed(chain):
        val = env[end]
        if not (isinstance(val, torch.Tensor) and val.dim() == 3 and tuple(val.shape[:2]) == (b, s)):
            continue
        if not _applies_a_weight(G.region(out, end), inputs_of, env):
            continue
        try:
            w, bias = affine_map(step, env, out, end, layer=p.layer, to_tokens=lambda t: t,
                                 to_source=lambda t: t.reshape(b, s, h, v).transpose(1, 2))
        except SiteError as e:
            why = e.reason
            continue
        return end, w, bias
    raise SiteError(p.layer, out.name, why)


def _applies_a_weight(nodes: list[fx.Node], inputs_of: set, env: dict) -> bool:
    return any(a not in inputs_of and isinstance(env.get(a), torch.Tensor) and env[a].dim() >= 2
               for n in nodes for a in n.all_input_nodes)


def _linear(w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    return _loaded(nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=dtype), w, b)


def _loaded(layer: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """``layer`` with its ``weight`` (and ``bias``) set to the folded float64 values."""
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def lower_absorbed(program: StepProgram, settings: LoweringSettings) -> int:
    """Converted models: W_uk and W_uv folded where a site qualifies → sites folded; the report
    (``{"sites": n, "left": {layer: why}}``) goes to ``notes["absorbed_projections"]``."""
    if not settings.absorb or program.kind != "mla":
        return 0
    modules = [m for m in program.gm.modules() if isinstance(m, LatentAttention) and m.form == "absorbed"]
    if settings.prefill == "decompressed":
        for m in modules:
            m.form = "auto"
    ids, mask, pos, past = program.example_inputs()
    report = absorb_projections(program.gm, (ids, pos, mask, *past))
    for m in modules:           # a site left unfolded keeps the one absorbed form
        if m.query_nope_projection is None:
            m.form = "absorbed"
    program.notes["absorbed_projections"] = report
    both = [m for m in modules if m.query_nope_projection is not None]
    folded = sum(m.query_latent is not None for m in both)
    program.notes["prefill"] = (f"prompts (S > 1) decompressed at {len(both)} of {len(modules)} sites (K/V expanded "
                                "from the written latent rows, ONNX Attention), one-token steps absorbed: one If per "
                                f"site; W_uk / W_uv folded into the decode projections at {folded} of them, applied "
                                "per head after the shared projections at the others (fewer weight bytes)"
                                if both else "every step absorbed")
    return report["sites"]
