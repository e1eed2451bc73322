"""RMSNorm → SimplifiedLayerNormalization (or ONNX's RMSNormalization); residual add + RMSNorm →
SkipSimplifiedLayerNormalization."""
from __future__ import annotations

import onnx
from onnx import helper

from .graph import MS, Graph, other_input, single_use


NORM_OPS = ("SimplifiedLayerNormalization", "RMSNormalization")    # onnxruntime's kernel | ONNX's (opset 23)


def fuse_rms_norms(g: Graph, op: str = NORM_OPS[0]) -> int:
    """``op``: onnxruntime's kernel (its schema in the default domain, not in the ONNX standard),
    or the standard ``RMSNormalization`` for runtimes that take only standard ops (TensorRT)."""
    if op not in NORM_OPS:
        raise ValueError(f"op must be one of {NORM_OPS}, got {op!r}")
    fused = 0
    for mean in [n for n in g.nodes if n is not None and n.op_type == "ReduceMean" and n.domain == ""]:
        match = _match_rms_norm(g, mean) if g.live(mean) else None
        if match is None:
            continue
        x, scale, eps, out_node, chain = match
        node = helper.make_node(op, [x, scale], list(out_node.output),
                                name=g.fresh("rms_norm"), axis=-1, epsilon=eps, stash_type=1)
        g.replace(out_node, node, chain)
        fused += 1
    return fused


def _match_rms_norm(g: Graph, mean: onnx.NodeProto):
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
    add = single_use(g, mean.output[0], "Add")
    eps = g.scalar(other_input(add, mean.output[0])) if add is not None else None
    if eps is None or eps < 0:
        return None
    sqrt = single_use(g, add.output[0], "Sqrt")
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
        normalized = single_use(g, recip.output[0], "Mul")
        if normalized is None or other_input(normalized, recip.output[0]) != x:
            return None
        chain.append(recip)
    else:
        return None
    scaled = single_use(g, normalized.output[0], "Mul")
    if scaled is None:
        return None
    scale = other_input(scaled, normalized.output[0])
    if g.shape(scale) != [x_shape[-1]] or g.shape(scaled.output[0]) not in (None, x_shape):
        return None
    chain.append(normalized)
    return x, scale, eps, scaled, chain


def fuse_skip_adds(g: Graph) -> int:
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
