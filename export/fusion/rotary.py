"""RoPE in the half layout (HF rotate_half) → ONNX RotaryEmbedding."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph import Graph, attr, single_use

ROTARY_OPSET = 23                # ONNX RotaryEmbedding


def fuse_rotaries(g: Graph) -> int:
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


def _match_rotary(g: Graph, add: onnx.NodeProto):
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


def _is_rotate_half(g: Graph, r: str, x: str, half: int) -> bool:
    """``r = Concat(Neg(x[..., half:]), x[..., :half])`` on the last axis of a 4-D ``x``."""
    cat = g.node(r, "Concat")
    if cat is None or len(cat.input) != 2 or attr(cat, "axis") not in (-1, 3):
        return False
    neg = g.node(cat.input[0], "Neg")
    return neg is not None and _last_axis_slice(g, neg.input[0], x) == (half, 2 * half) and \
        _last_axis_slice(g, cat.input[1], x) == (0, half)


def _last_axis_slice(g: Graph, name: str, x: str) -> tuple[int, int] | None:
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


def _table_source(g: Graph, name: str, op: str, rank: int) -> str | None:
    """``name = [Unsqueeze(·, axis 1) of] op(Concat(f, f, axis=-1))`` → f."""
    n = g.node(name, "Unsqueeze")
    if n is not None:
        axes = g.const(n.input[1]) if len(n.input) > 1 else np.array(attr(n, "axes"))
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
    if not f_shape or attr(cat, "axis") not in (-1, len(f_shape) - 1):
        return None
    return cat.input[0]


def _packed_form(g: Graph, x: str, add: onnx.NodeProto):
    """If ``x = Transpose(Reshape(y [B,S,H·D] → [B,S,H,D]), (0,2,1,3))`` and the rotation's only
    use is ``Reshape(Transpose(·, (0,2,1,3)))`` back to ``[B,S,H·D]``: (y, H, those two nodes)."""
    t_in = g.node(x, "Transpose")
    r_in = g.node(t_in.input[0], "Reshape") if t_in is not None and attr(t_in, "perm") == [0, 2, 1, 3] else None
    if r_in is None:
        return None
    y, y_shape, y4 = r_in.input[0], g.shape(r_in.input[0]), g.shape(r_in.output[0])
    if not y_shape or not y4 or len(y_shape) != 3 or len(y4) != 4 or not all(isinstance(d, int) for d in y4[2:]) \
            or y_shape[2] != y4[2] * y4[3] or y4[:2] != y_shape[:2]:
        return None
    t_out = single_use(g, add.output[0], "Transpose")
    if t_out is None or attr(t_out, "perm") != [0, 2, 1, 3]:
        return None
    r_out = single_use(g, t_out.output[0], "Reshape")
    if r_out is None or g.shape(r_out.output[0]) != y_shape:
        return None
    return y, y4[2], [t_out, r_out]
