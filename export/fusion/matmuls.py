"""Sibling projections (MatMuls of one input by constant weights: q/k/v, gate/up) → one MatMul + Split."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import Graph, drop_initializer


def pack_matmuls(g: Graph) -> int:
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
            drop_initializer(g, n.input[1])
        packed += 1
    return packed


def _packable_weight(g: Graph, n: onnx.NodeProto) -> bool:
    w = g.initializers.get(n.input[1])
    return w is not None and len(w.dims) == 2 and len(g.uses(n.input[1])) == 1 and n.input[1] not in g.outputs and \
        not (w.data_location == onnx.TensorProto.EXTERNAL and not w.raw_data)
