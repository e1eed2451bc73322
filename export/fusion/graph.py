"""The ONNX graph the fusions edit: nodes indexed by their inputs and outputs, edits committed in topological order."""
from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"


class Graph:
    """Index over a GraphProto: producers, consumers, constants and static shapes. Rewrites
    replace a matched node by a new node in the same slot (its inputs are all produced earlier,
    so topological order holds) and drop the nodes the match made dead."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes: list[onnx.NodeProto | None] = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            self._index(i, n)
        # values an If's branches read from this graph are pinned like outputs: fusions neither remove
        # nor rename them (their readers inside the branches are not indexed)
        self.outputs = {o.name for o in graph.output} | {x for n in graph.node for x in subgraph_reads(n)}
        self.initializers = {t.name: t for t in graph.initializer}
        self.shapes: dict[str, list] = {}
        for v in [*graph.input, *graph.value_info, *graph.output]:
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                                       for d in v.type.tensor_type.shape.dim]
        for t in graph.initializer:
            self.shapes[t.name] = list(t.dims)
        self._fresh = 0

    def _index(self, i: int, n: onnx.NodeProto) -> None:
        for o in n.output:
            if o:
                self.producer[o] = i
        for x in n.input:
            if x:
                self.consumers[x].append(i)

    def node(self, name: str, op: str | None = None) -> onnx.NodeProto | None:
        """The live node producing ``name`` (of type ``op`` in the default domain, if given)."""
        i = self.producer.get(name)
        n = self.nodes[i] if i is not None else None
        if n is None or (op is not None and (n.op_type != op or n.domain not in ("", "ai.onnx"))):
            return None
        return n

    def live(self, node: onnx.NodeProto) -> bool:
        return any(n is node for n in self.nodes)

    def slot(self, node: onnx.NodeProto) -> int:
        """Position of ``node`` (by identity: protobuf ``==`` compares contents)."""
        return next(i for i, n in enumerate(self.nodes) if n is node)

    def uses(self, name: str) -> list[onnx.NodeProto]:
        return [self.nodes[i] for i in self.consumers.get(name, ()) if self.nodes[i] is not None]

    def private(self, name: str, reader: onnx.NodeProto) -> bool:
        """``name`` is read by ``reader`` alone and is not a graph output: safe to fold away."""
        users = self.uses(name)
        return name not in self.outputs and len(users) == 1 and users[0] is reader

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            t = self.initializers[name]
            if t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data:
                return None       # not loaded: the patterns need only small inline constants
            return numpy_helper.to_array(t)
        n = self.node(name, "Constant")
        if n is not None:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.array(helper.get_attribute_value(a))
                if a.name in ("value_floats", "value_ints"):
                    return np.array(helper.get_attribute_value(a))
        return None

    def scalar(self, name: str) -> float | None:
        v = self.const(name)
        return float(v.reshape(())) if v is not None and v.size == 1 else None

    def shape(self, name: str) -> list | None:
        return self.shapes.get(name)

    def fresh(self, stem: str) -> str:
        self._fresh += 1
        return f"_fused_{stem}_{self._fresh}"

    def replace(self, old: onnx.NodeProto, new: onnx.NodeProto, dead: list[onnx.NodeProto]) -> None:
        """Put ``new`` in ``old``'s slot and remove ``dead`` (nodes the match folded away)."""
        slot = self.slot(old)
        for n in [old, *dead]:
            self.nodes[self.slot(n)] = None
        self.nodes[slot] = new
        self._reindex()

    def remove(self, nodes: list[onnx.NodeProto]) -> None:
        for n in nodes:
            self.nodes[self.slot(n)] = None
        self._reindex()

    def insert_before(self, anchor: onnx.NodeProto, new: onnx.NodeProto) -> None:
        self.nodes.insert(self.slot(anchor), new)
        self._reindex()

    def _reindex(self) -> None:
        self.producer.clear()
        self.consumers.clear()
        for i, n in enumerate(self.nodes):
            if n is not None:
                self._index(i, n)

    def drop_dead(self, names: list[str]) -> None:
        """Remove the producers of ``names`` (and theirs, transitively) once nothing reads them."""
        todo = list(names)
        while todo:
            name = todo.pop()
            n = self.node(name)
            if n is None or any(o in self.outputs or self.uses(o) for o in n.output if o):
                continue
            i = self.slot(n)
            self.nodes[i] = None
            for x in n.input:
                if x and i in self.consumers.get(x, []):
                    self.consumers[x].remove(i)
                    todo.append(x)

    def commit(self) -> None:
        live = topological([n for n in self.nodes if n is not None])
        del self.graph.node[:]
        self.graph.node.extend(live)
        values = {o for n in live for o in n.output}
        kept = [v for v in self.graph.value_info if v.name in values]     # shapes of values that are gone
        del self.graph.value_info[:]
        self.graph.value_info.extend(kept)


def topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input is produced first, as close to the given order as
    possible (a fused node takes one matched node's slot, which may come after a reader of
    another of its outputs, e.g. the residual sum)."""
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting: dict[str, list[int]] = defaultdict(list)
    missing = [{x for x in [*n.input, *subgraph_reads(n)] if x in produced_by} for n in nodes]  # rest: inputs, weights
    for i, need in enumerate(missing):
        for x in need:
            waiting[x].append(i)
    order, done = [], [False] * len(nodes)
    heap = [i for i, need in enumerate(missing) if not need]
    heapq.heapify(heap)
    while heap:
        i = heapq.heappop(heap)
        if done[i]:
            continue
        done[i] = True
        order.append(nodes[i])
        for o in nodes[i].output:
            for j in waiting.pop(o, ()):
                missing[j].discard(o)
                if not missing[j]:
                    heapq.heappush(heap, j)
    if len(order) != len(nodes):
        raise RuntimeError("fusion left a cycle in the graph: a bug in export/fusion.py (export with fuse=False)")
    return order


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The outer-scope values the subgraphs of ``node`` (If branches, loop bodies) read."""
    names: set[str] = set()
    for a in node.attribute:
        bodies = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for body in bodies:
            inner = {v.name for v in body.input} | {t.name for t in body.initializer} | \
                {o for n in body.node for o in n.output}
            for n in body.node:
                names |= {x for x in [*n.input, *subgraph_reads(n)] if x and x not in inner}
            names |= {v.name for v in body.output if v.name not in inner}
    return names


def other_input(node: onnx.NodeProto, name: str) -> str | None:
    """The other input of a binary node, one of whose inputs is ``name``."""
    a, b = node.input[0], node.input[1]
    return b if a == name else a if b == name else None


def single_use(g: Graph, name: str, op: str) -> onnx.NodeProto | None:
    users = g.uses(name)
    if len(users) != 1 or name in g.outputs or users[0].op_type != op or users[0].domain != "":
        return None
    return users[0]


def drop_initializer(g: Graph, name: str) -> None:
    if g.uses(name) or name in g.outputs:
        return
    t = g.initializers.pop(name)
    g.graph.initializer.remove(t)


def attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return list(v) if isinstance(v, (list, tuple)) else v
    return None


def import_domain(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))
