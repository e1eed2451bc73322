"""Find every attention block in a captured decoder graph, by dataflow alone.

Letters: B batch, S sequence, H query heads, Hkv key/value heads, Dh head dim, Dv value head
dim, D hidden width. A site is anchored on its attention core and walked back to the hidden
state it reads::

    x_BSD ──(affine: linear / addmm / fused qkv + split / views)──> key_raw ──RoPE?──> key_BHkvSDh
      │                                                                  │ (repeat_kv | enable_gqa)
      ├──(anything)──> query_raw ──RoPE?──> query_BHSDh ─┐               v
      └──(affine)──> value_BHkvSDv ────────────────────── core: softmax(q kᵀ·scale [softcap] + mask) v
                                                          (SDPA op, or matmul → scale → mask → softmax → matmul)

RoPE is not pattern-matched: it is the region between the nearest node that all of k's
dataflow funnels through (a dominator) and the attention input, provided that region reads a
position-dependent tensor (cos/sin). Its layout (half / interleaved / partial / none) and
frequencies are measured by probing it (see ``probe.py``), so every family's idiom works.

Refusals name the layer, the node and the reason; nothing here changes the graph.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import graph as G

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_PROJECTION_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_AFFINE_STEP_OPS = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor,
    aten.select.int, aten.narrow.default, aten.unbind.int,
    aten.index.Tensor, aten.index_select.default,          # constant-index gathers (Falcon's fused qkv)
}


class SiteError(ValueError):
    """An attention site that cannot be rewritten exactly; says where and why."""

    def __init__(self, layer: str, node: str, reason: str):
        self.layer, self.node, self.reason = layer, node, reason
        self.cached_values_per_token = 0     # what the untouched site keeps caching, when known
        super().__init__(f"attention at {layer} (node '{node}'): {reason}")


@dataclass
class AttentionCore:
    """The op(s) computing softmax(q·kᵀ·scale [softcap] + mask)·v, and their inputs."""
    kind: str                   # "sdpa" | "eager"
    anchor: fx.Node             # the SDPA node, or the softmax node
    query: fx.Node              # query_BHSDh as fed to the core
    key: fx.Node                # key as fed (H or Hkv heads)
    value: fx.Node
    output: fx.Node             # out_BHSDv
    mask: fx.Node | None
    is_causal: bool
    scale: float | None         # None: 1/sqrt(Dh)
    softcap: float | None = None
    enable_gqa: bool = False


@dataclass
class KeyNormMatch:
    """k = w ⊙ t · rsqrt(mean_group(t²) + eps) with t affine in x (Qwen3: group = one head;
    OLMo2: group = the whole projection)."""
    norm_in: fx.Node        # t
    norm_out: fx.Node
    eps: float
    group: str              # "head" | "all"


@dataclass
class AttentionSite:
    """One attention block, as the rewrite needs it. Weights are filled in by ``probe``."""
    index: int
    layer: str
    core: AttentionCore
    hidden: fx.Node                      # x_BSD, the input of the k/v projections
    query_raw: fx.Node                   # q before RoPE (== core query when there is no RoPE)
    query_rope_nodes: list[fx.Node]
    key_raw: fx.Node                     # k before RoPE, [B,Hkv,S,Dh] or [B,S,Hkv,Dh]
    key_head: fx.Node                    # k after RoPE, before repeat_kv: [B,Hkv,S,Dh]
    key_rope_nodes: list[fx.Node]        # region key_raw → key_head (empty: no RoPE)
    value_head: fx.Node                  # [B,Hkv,S,Dv]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    value_dim: int
    gqa_form: str                        # "mha" | "repeat_kv" | "enable_gqa"
    fused_qkv: bool
    raw_layouts: dict[str, str]          # {"query"|"key": "BHSD"|"BSHD"} of query_raw / key_raw
    rope_tables: list[str] = field(default_factory=list)   # names of the cos/sin source nodes
    key_norm: KeyNormMatch | None = None                  # RMSNorm between k's projection and RoPE
    key_norm_weights: object | None = None                # filled by probe
    # filled by probe.extract_site_weights
    kv_head_of_query: tuple[int, ...] = ()
    weights: object | None = None
    rope: object | None = None

    @property
    def scale(self) -> float:
        return self.core.scale if self.core.scale is not None else self.head_dim ** -0.5


def find_attention_cores(gm: fx.GraphModule) -> list[AttentionCore | SiteError]:
    cores: list[AttentionCore | SiteError] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in G.SDPA_OPS:
            cores.append(_sdpa_core(n))
        elif n.target in G.SOFTMAX_OPS:
            core = _eager_core(n)
            if core is not None:
                cores.append(core)
    return cores


def _sdpa_core(n: fx.Node) -> AttentionCore:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    a = dict(zip(names, n.args))
    a.update(n.kwargs)
    return AttentionCore(
        kind="sdpa", anchor=n, query=a["query"], key=a["key"], value=a["value"], output=n,
        mask=a.get("attn_mask"), is_causal=bool(a.get("is_causal", False)),
        scale=a.get("scale"), enable_gqa=bool(a.get("enable_gqa", False)))


def _eager_core(softmax: fx.Node) -> AttentionCore | SiteError | None:
    """matmul(q, kᵀ) → [·scale] → [softcap] → [+mask] → softmax → [cast/dropout] → matmul(·, v)."""
    layer = layer_name(softmax)
    # forward: the probabilities must feed a matmul with v
    out = softmax
    while len(out.users) == 1 and (G.is_layout_op(next(iter(out.users)))
                                   or next(iter(out.users)).target in G.DROPOUT_OPS
                                   or next(iter(out.users)).target in {aten.to.dtype, aten._to_copy.default}):
        out = next(iter(out.users))
    pv = [u for u in out.users if u.op == "call_function" and u.target in G.MATMUL_OPS and u.args[0] is out]
    if len(pv) != 1:
        return None  # a softmax that is not attention (a router, a classifier head)
    # backward: the score chain
    node, scale, softcap, mask = softmax.args[0], 1.0, None, None
    stage = 0  # 0: may see mask, 1: may see softcap, 2: scale only
    while True:
        t = node.target if node.op == "call_function" else None
        if t in {aten.to.dtype, aten._to_copy.default} or G.is_layout_op(node):
            node = node.args[0]
        elif t is aten.add.Tensor and stage == 0 and all(isinstance(a, fx.Node) for a in node.args[:2]):
            lhs, rhs = node.args[:2]
            scores_side = lhs if _reaches_matmul(lhs) else rhs
            mask = rhs if scores_side is lhs else lhs
            node, stage = scores_side, 1
        elif t is aten.mul.Tensor and stage <= 1 and _is_softcap(node):
            tanh = node.args[0] if isinstance(node.args[0], fx.Node) else node.args[1]
            softcap = float(node.args[1] if isinstance(node.args[1], (int, float)) else node.args[0])
            node, stage = tanh.args[0].args[0], 2
        elif t in {aten.mul.Tensor, aten.div.Tensor} and _scalar_arg(node) is not None:
            c = _scalar_arg(node)
            scale = scale * c if t is aten.mul.Tensor else scale / c
            node, stage = _tensor_arg(node), 2
        elif t in G.MATMUL_OPS:
            q, kt = node.args[:2]
            key = _untranspose_last_two(kt)
            if key is None:
                return SiteError(layer, kt.name, "score matmul's right operand is not a transposed key")
            return AttentionCore(kind="eager", anchor=softmax, query=q, key=key, value=pv[0].args[1],
                                 output=pv[0], mask=mask, is_causal=False, scale=scale, softcap=softcap)
        else:
            return SiteError(layer, node.name, f"op {t or node.op} between the q·kᵀ matmul and the softmax "
                             "is not a scale, softcap or additive mask")


def _reaches_matmul(node: fx.Node) -> bool:
    return any(a.op == "call_function" and a.target in G.MATMUL_OPS for a in G.ancestors(node) | {node})


def _scalar_arg(node: fx.Node):
    for a in node.args[:2]:
        if isinstance(a, (int, float)):
            return float(a)
    return None


def _tensor_arg(node: fx.Node) -> fx.Node:
    return next(a for a in node.args[:2] if isinstance(a, fx.Node))


def _is_softcap(node: fx.Node) -> bool:
    tanh = next((a for a in node.args[:2] if isinstance(a, fx.Node)), None)
    return (tanh is not None and tanh.target is aten.tanh.default and _scalar_arg(node) is not None
            and tanh.args[0].target is aten.div.Tensor and _scalar_arg(tanh.args[0]) is not None)


def _untranspose_last_two(kt: fx.Node) -> fx.Node | None:
    if kt.target is aten.transpose.int:
        dims = {d % 4 for d in kt.args[1:3]}
        if dims == {2, 3}:
            return kt.args[0]
    if kt.target is aten.permute.default and [d % 4 for d in kt.args[1]] == [0, 1, 3, 2]:
        return kt.args[0]
    return None


def layer_name(node: fx.Node) -> str:
    """A readable location for messages (the module path when export kept it)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        root = _DYNAMO_ROOT.match(path)
        if root:        # a dynamo graph: the traced frame's local is the model itself
            return path[root.end():] or node.name
        # torch.export of capture's wrapper (its ``model`` attribute), or of a test's ``m``
        return path.removeprefix("model.").removeprefix("m.") or node.name
    return node.name


# dynamo's name for the traced frame's local holding the model: L['self'], L['args'][0], L__self__
_DYNAMO_ROOT = re.compile(r"L\[[^\]]*\](?:\[\d+\])*\.|L__self__\.")


def build_site(index: int, core: AttentionCore, gm: fx.GraphModule, env: dict,
               position_dependent: set[fx.Node]) -> AttentionSite:
    layer = layer_name(core.anchor)
    q_val = env[core.query]
    if not (isinstance(q_val, torch.Tensor) and q_val.dim() == 4):
        raise SiteError(layer, core.query.name, "query is not a 4-D [batch, heads, seq, head_dim] tensor")
    batch, n_heads, seq, head_dim = q_val.shape

    key_head = _head_layout_node(core.key, env, batch, seq, head_dim)
    if key_head is None:
        raise SiteError(layer, core.key.name, "could not find the key in [batch, kv_heads, seq, head_dim] layout")
    n_kv = env[key_head].shape[1]
    value_dim = env[core.value].shape[-1]
    value_head = _head_layout_node(core.value, env, batch, seq, value_dim, heads=n_kv)
    if value_head is None:
        raise SiteError(layer, core.value.name, f"could not find the value with {n_kv} kv heads")
    if n_heads % n_kv:
        raise SiteError(layer, core.anchor.name, f"{n_heads} query heads are not a multiple of {n_kv} kv heads")

    hidden = _projection_input(value_head, position_dependent)
    if hidden is None:
        raise SiteError(layer, value_head.name, "the value is not an affine projection of a hidden state")
    if hidden not in G.ancestors(key_head):
        raise SiteError(layer, key_head.name, f"key and value read different inputs (value reads '{hidden.name}')")

    key_raw, key_rope, k_tables = _split_rope(hidden, key_head, position_dependent)
    q_source = hidden if hidden in G.ancestors(core.query) else _projection_input(core.query, position_dependent)
    if q_source is None:
        raise SiteError(layer, core.query.name, "could not trace the query back to a hidden state")
    query_raw, query_rope, _ = _split_rope(q_source, core.query, position_dependent)
    if bool(key_rope) != bool(query_rope):
        raise SiteError(layer, core.anchor.name, "RoPE is applied to only one of q and k")
    layouts = {"query": layout_of(env[query_raw], batch, seq), "key": layout_of(env[key_raw], batch, seq)}
    for raw in (key_raw, query_raw):
        if layouts["query" if raw is query_raw else "key"] is None:
            raise SiteError(layer, raw.name, f"RoPE input has shape {tuple(env[raw].shape)}, expected "
                            "[batch, heads, seq, head_dim] or [batch, seq, heads, head_dim]")

    if core.enable_gqa:
        gqa_form = "enable_gqa"
    elif n_kv == n_heads:
        gqa_form = "mha"
    else:
        gqa_form = "repeat_kv"
    key_norm = _find_key_norm(layer, hidden, key_raw, env, n_kv, head_dim)
    fused = _projection_input(key_raw, position_dependent, want="projection") is \
        _projection_input(value_head, position_dependent, want="projection")
    return AttentionSite(
        index=index, layer=layer, core=core, hidden=hidden, query_raw=query_raw, query_rope_nodes=query_rope,
        key_raw=key_raw, key_head=key_head, key_rope_nodes=key_rope, value_head=value_head,
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, value_dim=value_dim, gqa_form=gqa_form,
        fused_qkv=fused, raw_layouts=layouts, rope_tables=[t.name for t in k_tables], key_norm=key_norm)


def kv_values_per_token(core: AttentionCore, env) -> int:
    """K+V values cached per token by a core left as it is (fewest heads on k's and v's path)."""
    q = env[core.query]
    total = 0
    for fed in (core.key, core.value):
        val = env.get(fed)
        if not isinstance(val, torch.Tensor) or val.dim() != 4:
            return 0
        node = _head_layout_node(fed, env, q.shape[0], q.shape[2], val.shape[-1])
        total += (env[node].shape[1] if node is not None else val.shape[1]) * val.shape[-1]
    return total


def layout_of(val: torch.Tensor, batch: int, seq: int) -> str | None:
    if val.dim() != 4 or val.shape[0] != batch:
        return None
    if val.shape[2] == seq and val.shape[1] != seq:
        return "BHSD"
    if val.shape[1] == seq and val.shape[2] != seq:
        return "BSHD"
    return None


def _head_layout_node(start: fx.Node, env, batch, seq, dim, heads: int | None = None) -> fx.Node | None:
    """Walk back through views/repeat_kv to the node holding the fewest heads in BHSD layout."""
    best, node = None, start
    while True:
        v = env.get(node)
        if isinstance(v, torch.Tensor) and v.dim() == 4 and tuple(v.shape[::2]) == (batch, seq) \
                and v.shape[3] == dim and (heads is None or v.shape[1] == heads):
            if best is None or v.shape[1] < env[best].shape[1]:
                best = node
        if not G.is_layout_op(node):
            return best
        node = node.args[0]


def _projection_input(node: fx.Node, dependent: set[fx.Node], want: str = "input") -> fx.Node | None:
    """Walk back along the one data input through affine steps to the first weight multiply;
    return what it multiplies (views skipped), i.e. the hidden state (or, with
    ``want="projection"``, the multiply itself)."""
    while node.op == "call_function":
        data = [a for a in node.all_input_nodes if a in dependent and G.is_tensor_like(a)]
        if node.target in _PROJECTION_OPS:
            if len(data) != 1:
                return None
            if want == "projection":
                return node
            x = data[0]
            while G.is_layout_op(x):
                x = x.args[0]
            return x
        if len(data) != 1 or not (G.is_layout_op(node) or G.is_getitem(node) or node.target in _AFFINE_STEP_OPS):
            return None
        node = data[0]
    return None


def _split_rope(source: fx.Node, head: fx.Node, position_dependent: set[fx.Node]):
    """(raw node, RoPE region nodes, cos/sin source nodes); region empty when there is no RoPE."""
    x_dependent = G.descendants(source)
    for dom in G.dominators_towards(source, head):
        nodes = G.region(dom, head)
        tables = [e for e in G.region_externals(dom, nodes)
                  if e in position_dependent and e not in x_dependent and isinstance(G.value(e), torch.Tensor)]
        if tables:
            return dom, nodes, tables
    return head, [], []


def _find_key_norm(layer, hidden, key_raw, env, n_kv, head_dim) -> KeyNormMatch | None:
    """An RMSNorm on k's path: rsqrt(mean(t²) + eps) scaling t, then a weight (any form)."""
    between = G.region(hidden, key_raw)
    rsqrts = [n for n in between if n.op == "call_function" and n.target is aten.rsqrt.default]
    if not rsqrts:
        return None
    if len(rsqrts) > 1:
        raise SiteError(layer, rsqrts[1].name, "more than one normalisation on the key path")
    add = rsqrts[0].args[0]
    eps = _scalar_arg(add) if add.target is aten.add.Tensor else None
    mean = _tensor_arg(add) if eps is not None else None
    if mean is None or mean.target is not aten.mean.dim:
        raise SiteError(layer, rsqrts[0].name, "normalisation on the key path is not an RMSNorm (rsqrt(mean(x²)+eps))")
    square = mean.args[0]
    if square.target is aten.pow.Tensor_Scalar and square.args[1] == 2:
        t = square.args[0]
    elif square.target is aten.mul.Tensor and square.args[0] is square.args[1]:
        t = square.args[0]
    else:
        raise SiteError(layer, square.name, "normalisation on the key path does not average squares")
    while t.op == "call_function" and t.target in {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}:
        t = t.args[0]
    dims = [d % env[t].dim() for d in mean.args[1]]
    shape = env[t].shape
    if dims != [env[t].dim() - 1]:
        raise SiteError(layer, mean.name, f"key RMSNorm averages over dims {dims}, not the last one")
    if shape[-1] == head_dim and env[t].dim() == 4:
        group = "head"
    elif shape[-1] == n_kv * head_dim:
        group = "all"
    else:
        raise SiteError(layer, mean.name, f"key RMSNorm over {shape[-1]} values is neither one head nor all heads")
    out = key_raw
    while G.is_layout_op(out):
        out = out.args[0]
    return KeyNormMatch(norm_in=t, norm_out=out, eps=float(eps), group=group)
