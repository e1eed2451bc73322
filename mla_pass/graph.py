"""Small read-only helpers over torch.fx graphs: op classification, reachability, regions.

A *region* is the set of nodes strictly between a start node and an end node (end included):
the descendants of ``start`` that are ancestors of ``end``. Regions are how the matcher names
"the RoPE applied to k" or "the affine path from the hidden state to k" without knowing which
family wrote them, and how the rewrite copies such a piece of the graph onto a new input.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops that only move or re-view data. `slice` counts only when it keeps the whole axis
# (the repeat_kv idiom writes `x[:, :, None, :, :]`, which exports as full slices).
_LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.transpose.int, aten.permute.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.broadcast_to.default, aten.flatten.using_ints, aten.unflatten.int, aten.lift_fresh_copy.default,
}
_CAST_OPS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}

SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
DROPOUT_OPS = {aten.dropout.default}


def value(node) -> object:
    """The example value recorded by export (a FakeTensor or a SymInt), or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_full_slice(node: fx.Node) -> bool:
    if node.target is not aten.slice.Tensor:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    _, _dim, start, end, step = args[:5]
    return (start in (None, 0)) and (end is None or (isinstance(end, int) and end >= 2**62)) and step in (None, 1)


def is_layout_op(node: fx.Node) -> bool:
    """True for ops that change no value, only its view (casts to the same dtype included)."""
    if node.op != "call_function":
        return False
    if node.target in _LAYOUT_OPS or is_full_slice(node):
        return True
    if node.target in _CAST_OPS:
        src, out = value(node.args[0]), value(node)
        return src is not None and out is not None and src.dtype == out.dtype
    return False


def is_tensor_like(node: fx.Node) -> bool:
    """A tensor, or a tuple of tensors (the result of split/chunk)."""
    v = value(node)
    if isinstance(v, (tuple, list)):
        return bool(v) and all(isinstance(t, torch.Tensor) for t in v)
    return isinstance(v, torch.Tensor)


def ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def descendants(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for child in stack.pop().users:
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def region(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes on some path start → end (start excluded, end included), in graph order."""
    inside = descendants(start) & (ancestors(end) | {end})
    return [n for n in end.graph.nodes if n in inside]


def region_externals(start: fx.Node, nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """Inputs of a region that come from outside it (other than ``start``)."""
    nodes = list(nodes)
    inside = set(nodes) | {start}
    out: list[fx.Node] = []
    for n in nodes:
        for p in n.all_input_nodes:
            if p not in inside and p not in out:
                out.append(p)
    return out


def dominators_towards(source: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes that every path source → end passes through, nearest to ``end`` first.

    ``end`` and ``source`` themselves are not listed. Used to find where RoPE starts: the
    nearest node that all of k's dataflow from the hidden state funnels through.
    """
    between = [n for n in region(source, end) if n is not end]
    doms = []
    for cand in reversed(between):
        if not _reachable_avoiding(source, end, cand):
            doms.append(cand)
    return doms


def _reachable_avoiding(src: fx.Node, dst: fx.Node, avoid: fx.Node) -> bool:
    seen, stack = {src}, [src]
    while stack:
        for child in stack.pop().users:
            if child is dst:
                return True
            if child is not avoid and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


def depends_on_placeholders(gm: fx.GraphModule) -> set[fx.Node]:
    """Every node whose value depends on a graph input (token ids, positions, ...)."""
    dep: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(p in dep for p in n.all_input_nodes):
            dep.add(n)
    return dep


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """``graph.eliminate_dead_code`` that also drops unused seeded-random ops. torch.fx keeps
    those as impure, and SDPA is one (for its dropout): without this a replaced attention core,
    with the q/k/v projections feeding it, stays in the program and runs on every call."""
    def impure(n: fx.Node) -> bool:
        if n.op in ("placeholder", "output") or n.target in fx.node._side_effectful_functions:
            return True
        schema = getattr(n.target, "_schema", None)
        return n.op == "call_function" and schema is not None and schema.is_mutable

    return graph.eliminate_dead_code(is_impure_node=impure)


def run_region(gm: fx.GraphModule, nodes: list[fx.Node], env: dict[fx.Node, object],
               inputs: dict[fx.Node, object], *, cast: Callable | None = None) -> dict[fx.Node, object]:
    """Evaluate ``nodes`` (graph order) with some nodes' values replaced by ``inputs``.

    Values of nodes outside the region come from ``env`` (a recorded run), optionally passed
    through ``cast`` (used to evaluate a region in float64 for exact weight extraction).
    """
    local: dict[fx.Node, object] = dict(inputs)

    def lookup(a):
        if isinstance(a, fx.Node):
            if a in local:
                return local[a]
            v = env[a]
            return cast(v) if cast is not None else v
        return a

    for n in nodes:
        args = fx.node.map_aggregate(n.args, lookup)
        kwargs = fx.node.map_aggregate(n.kwargs, lookup)
        if n.op == "call_function":
            if cast is not None and n.target in _CAST_OPS:
                local[n] = args[0]  # keep the probe in its wide dtype
                continue
            local[n] = n.target(*args, **kwargs)
        elif n.op == "call_module":
            local[n] = gm.get_submodule(n.target)(*args, **kwargs)
        elif n.op == "call_method":
            local[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate node {n.name} ({n.op}) inside a region")
    return local


def record_values(gm: fx.GraphModule, *inputs, interpreter: type[fx.Interpreter] = fx.Interpreter
                  ) -> dict[fx.Node, object]:
    """Run the graph once and keep every node's value (small example inputs only).
    ``interpreter`` may override how nodes run (the backend substitutes its cache op)."""
    env: dict[fx.Node, object] = {}

    class _Recorder(interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            env[n] = out
            return out

    with torch.no_grad():
        _Recorder(gm).run(*inputs)
    return env


def copy_region(graph: fx.Graph, nodes: list[fx.Node], replace: dict[fx.Node, fx.Node]) -> dict[fx.Node, fx.Node]:
    """Copy ``nodes`` into ``graph`` (before the current insert point), inputs remapped."""
    mapping = dict(replace)
    for n in nodes:
        mapping[n] = graph.node_copy(n, lambda a: mapping.get(a, a))
    return mapping


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def clone_graph(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``graph`` with plain positional inputs; and the old → new node mapping."""
    new = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, mapping)
    new.output(out)
    return new, mapping


def clone_graph_module(gm: fx.GraphModule):
    """A new GraphModule over a copy of ``gm``'s graph, sharing its parameters and submodules."""
    graph, mapping = clone_graph(gm.graph)
    return fx.GraphModule(gm, graph), mapping


def insert_observer(gm: fx.GraphModule, target: fx.Node, name: str, observer: torch.nn.Module) -> fx.Node:
    """Splice ``observer`` (an identity module that records) after ``target``; returns its node."""
    gm.add_submodule(name, observer)
    with gm.graph.inserting_after(target):
        new = gm.graph.call_module(name, (target,))
    target.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def run_on_tokens(gm: fx.GraphModule, tokens: torch.Tensor, takes_positions: bool, *, batch_size: int,
                  desc: str, progress: bool) -> None:
    """Run a captured program over token batches (positions 0..L-1), for its observers' sake."""
    from tqdm.auto import tqdm

    device = next(gm.parameters()).device
    with torch.no_grad():
        for batch in tqdm(list(torch.split(tokens, batch_size)), desc=desc, disable=not progress, leave=False):
            batch = batch.to(device)
            args = (batch,)
            if takes_positions:
                args += (torch.arange(batch.shape[1], device=device).expand_as(batch).contiguous(),)
            gm(*args)
