"""Fuse the small-op idioms of an exported decoder into onnxruntime's kernels (a pass over ONNX).

``fuse(model) -> (model, counts)`` finds each pattern from the graph's dataflow (op types,
constants, static shapes), never from names or model families, and replaces it by one node
that computes the same function:

- **RMSNorm** ``γ · x · 1/√(mean(x²) + ε)`` (``Pow``/``ReduceMean``/``Add``/``Sqrt``/
  ``Reciprocal``/``Mul``/``Mul``, as ``torch.onnx`` writes ``x * torch.rsqrt(...)``; also
  ``Div(x, Sqrt)`` and ``Mul(x, x)``) → ``SimplifiedLayerNormalization`` (onnxruntime's kernel;
  its schema sits in the default domain). onnxruntime's own fuser does not see the pattern: it
  expects ``Div``, and ``torch.onnx`` writes ``Reciprocal`` + ``Mul``.
- **Residual add + RMSNorm** ``n = RMSNorm(a + b)`` with the sum also used downstream →
  com.microsoft ``SkipSimplifiedLayerNormalization`` (the sum is its fourth output).
- **RoPE, "half" layout** ``x·cos + rotate_half(x)·sin`` with ``cos, sin = Cos/Sin(Concat(f,
  f))`` (HF ``rotate_half``: ``Concat(−x[..., D/2:], x[..., :D/2])``) → ONNX ``RotaryEmbedding``
  (opset 23) fed the per-token half tables ``Cos(f)``, ``Sin(f)`` [B, S, D/2] (no position
  table, so nothing is assumed about the frequencies or the maximum length). When ``x`` is
  ``Transpose(Reshape(y))`` of a projection ``y [B, S, H·D]`` and the result goes back through
  ``Transpose`` → ``Reshape`` to ``[B, S, H·D]``, the op rotates ``y`` itself and the four
  layout nodes go.
- **Layout round trips** ``Reshape`` / ``Identity`` / inverse ``Transpose`` pairs that end in
  the shape they started from (v and the attention output around GroupQueryAttention) → nothing.
- **Sibling projections** MatMuls of one input by constant weights (q/k/v, gate/up) → one
  MatMul over the weights side by side + ``Split``.

A near miss (scaled cos/sin, interleaved rotation, a norm over another axis, a broadcasting
residual add, an intermediate another node also reads) keeps its nodes: it stays correct, just
not fused; LayerNormalization (GPT-2) is no RMSNorm and is left as it is. ``export/onnx.py``
runs this pass on the fp32 graph before the float16 or int8 conversions, and its export check
compares the fused graph with PyTorch.
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"
FUSIONS = ("rms_norm", "skip_rms_norm", "rotary", "layout", "packed_matmul")
ROTARY_OPSET = 23                # ONNX RotaryEmbedding


def fuse(model: onnx.ModelProto, only: tuple[str, ...] = FUSIONS) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` with the patterns above fused; ``counts[name]`` = sites fused.

    ``only`` picks a subset of ``FUSIONS`` (``skip_rms_norm`` works on the ``rms_norm`` result).
    """
    unknown = set(only) - set(FUSIONS)
    if unknown:
        raise ValueError(f"unknown fusions {sorted(unknown)}: choose from {FUSIONS}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counts = dict.fromkeys(FUSIONS, 0)
    graph = _Graph(out.graph)
    if "rms_norm" in only:
        counts["rms_norm"] = _fuse_rms_norms(graph)
    if "skip_rms_norm" in only:
        counts["skip_rms_norm"] = _fuse_skip_adds(graph)
    if "rotary" in only:
        counts["rotary"] = _fuse_rotaries(graph)
    if "layout" in only:
        counts["layout"] = _drop_round_trips(graph)
    if "packed_matmul" in only:
        counts["packed_matmul"] = _pack_matmuls(graph)
    graph.commit()
    if counts["skip_rms_norm"]:
        _import(out, MS, 1)
    if counts["rotary"]:
        _import(out, "", ROTARY_OPSET)
    return out, counts


def op_counts(model: onnx.ModelProto) -> Counter:
    """Nodes per op type (``domain::op`` for non-default domains)."""
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


class _Graph:
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
        self.outputs = {o.name for o in graph.output}
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
        live = _topological([n for n in self.nodes if n is not None])
        del self.graph.node[:]
        self.graph.node.extend(live)
        values = {o for n in live for o in n.output}
        kept = [v for v in self.graph.value_info if v.name in values]     # shapes of values that are gone
        del self.graph.value_info[:]
        self.graph.value_info.extend(kept)


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input is produced first, as close to the given order as
    possible (a fused node takes one matched node's slot, which may come after a reader of
    another of its outputs, e.g. the residual sum)."""
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting: dict[str, list[int]] = defaultdict(list)
    missing = [{x for x in n.input if x in produced_by} for n in nodes]    # the rest: inputs, initializers
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


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The other input of a binary node, one of whose inputs is ``name``."""
    a, b = node.input[0], node.input[1]
    return b if a == name else a if b == name else None


# -- RMSNorm ----------------------------------------------------------------------------------

def _fuse_rms_norms(g: _Graph) -> int:
    fused = 0
    for mean in [n for n in g.nodes if n is not None and n.op_type == "ReduceMean" and n.domain == ""]:
        match = _match_rms_norm(g, mean) if g.live(mean) else None
        if match is None:
            continue
        x, scale, eps, out_node, chain = match
        node = helper.make_node("SimplifiedLayerNormalization", [x, scale], list(out_node.output),
                                name=g.fresh("rms_norm"), axis=-1, epsilon=eps, stash_type=1)
        g.replace(out_node, node, chain)
        fused += 1
    return fused


def _match_rms_norm(g: _Graph, mean: onnx.NodeProto):
    """``ReduceMean(x², axes=[-1], keepdims=1)`` → ``+ε`` → ``Sqrt`` → ``Reciprocal`` → ``x·`` (or
    ``Div(x, ·)``) → ``·γ`` with γ of shape [d]; returns (x, γ, ε, last node, other nodes)."""
    square = g.node(mean.input[0])
    if square is None or not g.private(square.output[0], mean):
        return None
    if square.op_type == "Pow" and g.scalar(square.input[1]) == 2.0:
        x = square.input[0]
    elif square.op_type == "Mul" and square.input[0] == square.input[1]:
        x = square.input[0]
    else:
        return None
    x_shape = g.shape(x)
    if not x_shape or not isinstance(x_shape[-1], int) or x_shape[-1] <= 0:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in mean.attribute}
    axes = list(g.const(mean.input[1]).reshape(-1)) if len(mean.input) > 1 and mean.input[1] and \
        g.const(mean.input[1]) is not None else attrs.get("axes")
    if axes is None or [int(a) % len(x_shape) for a in axes] != [len(x_shape) - 1] or attrs.get("keepdims", 1) != 1:
        return None
    chain = [square, mean]
    add = _single_use(g, mean.output[0], "Add")
    eps = g.scalar(_other(add, mean.output[0])) if add is not None else None
    if eps is None or eps < 0:
        return None
    sqrt = _single_use(g, add.output[0], "Sqrt")
    if sqrt is None:
        return None
    chain += [add, sqrt]
    users = g.uses(sqrt.output[0])
    if len(users) != 1 or sqrt.output[0] in g.outputs:
        return None
    if users[0].op_type == "Div" and users[0].input[0] == x and users[0].input[1] == sqrt.output[0]:
        normalized = users[0]
    elif users[0].op_type == "Reciprocal":
        recip = users[0]
        normalized = _single_use(g, recip.output[0], "Mul")
        if normalized is None or _other(normalized, recip.output[0]) != x:
            return None
        chain.append(recip)
    else:
        return None
    scaled = _single_use(g, normalized.output[0], "Mul")
    if scaled is None:
        return None
    scale = _other(scaled, normalized.output[0])
    if g.shape(scale) != [x_shape[-1]] or g.shape(scaled.output[0]) not in (None, x_shape):
        return None
    chain.append(normalized)
    return x, scale, eps, scaled, chain


def _single_use(g: _Graph, name: str, op: str) -> onnx.NodeProto | None:
    users = g.uses(name)
    if len(users) != 1 or name in g.outputs or users[0].op_type != op or users[0].domain != "":
        return None
    return users[0]


# -- residual add + RMSNorm -------------------------------------------------------------------

def _fuse_skip_adds(g: _Graph) -> int:
    fused = 0
    for norm in [n for n in g.nodes if n is not None and n.op_type == "SimplifiedLayerNormalization"]:
        add = g.node(norm.input[0], "Add") if g.live(norm) else None
        if add is None:
            continue
        a, b = add.input
        shape = g.shape(add.output[0])
        # both addends the full [.., d] shape: the kernel adds no broadcast (2-D or 3-D input)
        if not shape or len(shape) not in (2, 3) or g.shape(a) != shape or g.shape(b) != shape:
            continue
        attrs = {x.name: helper.get_attribute_value(x) for x in norm.attribute}
        total = add.output[0]
        keep_sum = total in g.outputs or len(g.uses(total)) > 1
        outputs = [norm.output[0], "", "", total] if keep_sum else [norm.output[0]]
        node = helper.make_node("SkipSimplifiedLayerNormalization", [a, b, norm.input[1]], outputs,
                                domain=MS, name=g.fresh("skip_rms_norm"), epsilon=attrs.get("epsilon", 1e-5))
        g.replace(norm, node, [add])
        fused += 1
    return fused


# -- RoPE -------------------------------------------------------------------------------------

def _fuse_rotaries(g: _Graph) -> int:
    fused = 0
    tables: dict[str, tuple[str, str]] = {}      # f → (Cos(f), Sin(f)): one pair per frequency tensor
    for add in [n for n in g.nodes if n is not None and n.op_type == "Add" and n.domain == ""]:
        match = _match_rotary(g, add) if g.live(add) else None
        if match is None:
            continue
        x, freqs, dead = match
        if freqs not in tables:
            tables[freqs] = g.fresh("cos"), g.fresh("sin")
            anchor = g.uses(freqs)[0]
            for op, name in zip(("Cos", "Sin"), tables[freqs]):
                g.insert_before(anchor, helper.make_node(op, [freqs], [name], name=g.fresh(op.lower())))
        cos, sin = tables[freqs]
        packed = _packed_form(g, x, add)
        if packed is None:
            g.replace(add, helper.make_node("RotaryEmbedding", [x, cos, sin], list(add.output), name=g.fresh("rotary")),
                      [])
        else:      # rotate the projection [B,S,H·D] itself; the layout nodes on both sides go
            y, heads, layout_out = packed
            node = helper.make_node("RotaryEmbedding", [y, cos, sin], [layout_out[-1].output[0]],
                                    name=g.fresh("rotary"), num_heads=heads)
            g.replace(add, node, layout_out)
            dead.append(x)
        g.drop_dead(dead)
        fused += 1
    return fused


def _match_rotary(g: _Graph, add: onnx.NodeProto):
    """``Add(Mul(x, C), Mul(R, S))`` (any operand order) with ``R = Concat(Neg(x[..., h:]),
    x[..., :h])``, ``C = Cos(Concat(f, f))`` and ``S = Sin(Concat(f, f))`` (optionally
    ``Unsqueeze``d to x's rank), x ``[B, H, S, D]`` with D = 2h static; returns (x, f, names that
    may now be dead)."""
    if len(add.input) != 2:
        return None
    m1, m2 = g.node(add.input[0], "Mul"), g.node(add.input[1], "Mul")
    if m1 is None or m2 is None:
        return None
    for cos_mul, sin_mul in ((m1, m2), (m2, m1)):
        for x, c in (cos_mul.input[0], cos_mul.input[1]), (cos_mul.input[1], cos_mul.input[0]):
            for r, s in (sin_mul.input[0], sin_mul.input[1]), (sin_mul.input[1], sin_mul.input[0]):
                shape = g.shape(x)
                if not shape or len(shape) != 4 or not isinstance(shape[-1], int) or shape[-1] % 2:
                    continue
                if not _is_rotate_half(g, r, x, shape[-1] // 2):
                    continue
                fc, fs = _table_source(g, c, "Cos", len(shape)), _table_source(g, s, "Sin", len(shape))
                if fc is None or fc != fs or g.shape(fc) is None or g.shape(fc)[-1] != shape[-1] // 2:
                    continue
                if not all(g.private(v, n) for v, n in ((cos_mul.output[0], add), (sin_mul.output[0], add))):
                    continue
                return x, fc, [cos_mul.output[0], sin_mul.output[0], c, s]
    return None


def _is_rotate_half(g: _Graph, r: str, x: str, half: int) -> bool:
    """``r = Concat(Neg(x[..., half:]), x[..., :half])`` on the last axis of a 4-D ``x``."""
    cat = g.node(r, "Concat")
    if cat is None or len(cat.input) != 2 or _attr(cat, "axis") not in (-1, 3):
        return False
    neg = g.node(cat.input[0], "Neg")
    return neg is not None and _last_axis_slice(g, neg.input[0], x) == (half, 2 * half) and \
        _last_axis_slice(g, cat.input[1], x) == (0, half)


def _last_axis_slice(g: _Graph, name: str, x: str) -> tuple[int, int] | None:
    """(start, end) if ``name = x[..., start:end]`` on the last of 4 axes (an end past the
    axis reads as its length)."""
    n = g.node(name, "Slice")
    if n is None or n.input[0] != x or len(n.input) < 4:
        return None
    starts, ends, axes = (g.const(v) for v in n.input[1:4])
    steps = g.const(n.input[4]) if len(n.input) > 4 and n.input[4] else np.array([1])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(axes.reshape(-1)[0]) % 4 != 3 \
            or int(steps.reshape(-1)[0]) != 1:
        return None
    d = g.shape(x)[-1]
    return int(starts.reshape(-1)[0]), min(int(ends.reshape(-1)[0]), d)


def _table_source(g: _Graph, name: str, op: str, rank: int) -> str | None:
    """``name = [Unsqueeze(·, axis 1) of] op(Concat(f, f, axis=-1))`` → f."""
    n = g.node(name, "Unsqueeze")
    if n is not None:
        axes = g.const(n.input[1]) if len(n.input) > 1 else np.array(_attr(n, "axes"))
        if axes is None or [int(a) for a in np.reshape(axes, -1)] != [1]:
            return None
        name = n.input[0]
    elif g.shape(name) is None or len(g.shape(name)) != rank - 1:
        return None
    trig = g.node(name, op)
    cat = g.node(trig.input[0], "Concat") if trig is not None else None
    if cat is None or len(cat.input) != 2 or cat.input[0] != cat.input[1]:
        return None
    f_shape = g.shape(cat.input[0])
    if not f_shape or _attr(cat, "axis") not in (-1, len(f_shape) - 1):
        return None
    return cat.input[0]


def _packed_form(g: _Graph, x: str, add: onnx.NodeProto):
    """If ``x = Transpose(Reshape(y [B,S,H·D] → [B,S,H,D]), (0,2,1,3))`` and the rotation's only
    use is ``Reshape(Transpose(·, (0,2,1,3)))`` back to ``[B,S,H·D]``: (y, H, those two nodes)."""
    t_in = g.node(x, "Transpose")
    r_in = g.node(t_in.input[0], "Reshape") if t_in is not None and _attr(t_in, "perm") == [0, 2, 1, 3] else None
    if r_in is None:
        return None
    y, y_shape, y4 = r_in.input[0], g.shape(r_in.input[0]), g.shape(r_in.output[0])
    if not y_shape or not y4 or len(y_shape) != 3 or len(y4) != 4 or not all(isinstance(d, int) for d in y4[2:]) \
            or y_shape[2] != y4[2] * y4[3] or y4[:2] != y_shape[:2]:
        return None
    t_out = _single_use(g, add.output[0], "Transpose")
    if t_out is None or _attr(t_out, "perm") != [0, 2, 1, 3]:
        return None
    r_out = _single_use(g, t_out.output[0], "Reshape")
    if r_out is None or g.shape(r_out.output[0]) != y_shape:
        return None
    return y, y4[2], [t_out, r_out]


# -- layout round trips -------------------------------------------------------------------------

def _drop_round_trips(g: _Graph) -> int:
    """``z = Reshape(… y)`` through Reshape / Identity / adjacent inverse Transpose pairs, with
    z of y's shape (equal sizes or the same symbols): z is y, so its readers read y."""
    dropped = 0
    for z in [n for n in g.nodes if n is not None and n.op_type == "Reshape" and n.domain == ""]:
        if not g.live(z) or z.output[0] in g.outputs:
            continue
        y, chain = z.input[0], [z]
        while True:
            p = g.node(y)
            if p is None or not g.private(y, chain[-1]):
                break
            if p.op_type in ("Reshape", "Identity") and p.domain == "":
                y, chain = p.input[0], chain + [p]
                continue
            q = g.node(p.input[0], "Transpose") if p.op_type == "Transpose" and p.domain == "" else None
            if q is not None and g.private(q.output[0], p) and _inverse(_attr(q, "perm"), _attr(p, "perm")):
                y, chain = q.input[0], chain + [p, q]
                continue
            break
        shape = g.shape(z.output[0])
        if len(chain) < 2 or not shape or None in shape or g.shape(y) != shape:
            continue
        for reader in g.uses(z.output[0]):
            reader.input[:] = [y if x == z.output[0] else x for x in reader.input]
        g.remove(chain)
        g.drop_dead([x for n in chain for x in n.input[1:] if x])
        dropped += 1
    return dropped


def _inverse(p: list | None, q: list | None) -> bool:
    return p is not None and q is not None and len(p) == len(q) and [p[i] for i in q] == list(range(len(p)))


# -- sibling projections ---------------------------------------------------------------------------

def _pack_matmuls(g: _Graph) -> int:
    """MatMuls that read one input with constant [K, N_i] weights (q/k/v, gate/up, latent + rope
    key) → one MatMul over the weights side by side and a Split: one pass over the activations
    and one kernel launch instead of several; every output column is the same dot product."""
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.nodes:
        if n is not None and n.op_type == "MatMul" and n.domain == "" and _packable_weight(g, n):
            groups[n.input[0]].append(n)
    packed = 0
    for a, siblings in groups.items():
        if len(siblings) < 2:
            continue
        weights = [numpy_helper.to_array(g.initializers[n.input[1]]) for n in siblings]
        if len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        name = g.fresh("packed_weight")
        g.graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), name))
        g.initializers[name] = g.graph.initializer[-1]
        total, sizes = g.fresh("packed"), g.fresh("packed_sizes")
        g.graph.initializer.append(numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), sizes))
        matmul = helper.make_node("MatMul", [a, name], [total], name=g.fresh("packed_matmul"))
        split = helper.make_node("Split", [total, sizes], [n.output[0] for n in siblings], axis=-1,
                                 name=g.fresh("packed_split"))
        first = min(g.slot(n) for n in siblings)
        g.nodes[first:first] = [matmul, split]
        g.remove(siblings)
        for n in siblings:
            _drop_initializer(g, n.input[1])
        packed += 1
    return packed


def _packable_weight(g: _Graph, n: onnx.NodeProto) -> bool:
    w = g.initializers.get(n.input[1])
    return w is not None and len(w.dims) == 2 and len(g.uses(n.input[1])) == 1 and n.input[1] not in g.outputs and \
        not (w.data_location == onnx.TensorProto.EXTERNAL and not w.raw_data)


def _drop_initializer(g: _Graph, name: str) -> None:
    if g.uses(name) or name in g.outputs:
        return
    t = g.initializers.pop(name)
    g.graph.initializer.remove(t)


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return list(v) if isinstance(v, (list, tuple)) else v
    return None


def _import(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))
