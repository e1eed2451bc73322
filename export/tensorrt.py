"""The TensorRT profile of an export: standard ONNX only, caches as TensorRT's parser takes them, and the check.

``to_onnx(..., target="tensorrt")`` exports the same step program as the default target with
what TensorRT's ONNX parser (onnx-tensorrt, ``docs/operators.md``) refuses taken out: no
com.microsoft op (the baseline keeps masked SDPA, exported as ONNX ``Attention`` without past
inputs, instead of GroupQueryAttention; RMSNorm is fused to ONNX's ``RMSNormalization``; no
``MatMulNBits`` / ``MatMulInteger``), opset 24, and every cache tensor 4-D with its tokens on
axis −2, as ``TensorScatter`` must be there (``caches_for_tensorrt``: the latent [B, T, C]
becomes [B, 1, T, C]). It is useful to any runtime that takes only standard ONNX.

``violations(model)`` encodes the parser's restrictions as data (``SUPPORTED``, ``OPSETS``,
``RULES``) and names every node that breaks one; ``check(model)`` refuses such a graph with
``ExportError``. The export check then runs the profile's graph in onnxruntime against PyTorch
like every export.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mla_pass.export.common import ExportError

# ONNX opsets the parser reads (the default domain)
OPSETS = (9, 24)
# Operators with "Y" in onnx-tensorrt's support matrix (TensorRT 10.x), plus the opset-23/24
# transformer ops its newer parsers map to dedicated layers (TensorScatter → KV-cache update,
# Attention, RotaryEmbedding, RMSNormalization). Anything else, or any other domain, fails there
# (an unknown op falls back to a plugin lookup).
SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear
Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
HardSwish Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow
PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())


@dataclass(frozen=True)
class Rule:
    """One of the parser's restrictions on an op: ``broken(node, graph)`` → why, or None."""
    op: str
    says: str
    broken: Callable[[onnx.NodeProto, "_Info"], str | None]


class _Info:
    """Ranks, element types and constants of a graph's values (from shape inference)."""

    def __init__(self, model: onnx.ModelProto):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:               # a graph inference cannot read still gets the op-level checks
            inferred = model
        g = inferred.graph
        self.types: dict[str, onnx.TypeProto.Tensor] = {}
        for v in [*g.input, *g.value_info, *g.output]:
            if v.type.HasField("tensor_type"):
                self.types[v.name] = v.type.tensor_type
        self.constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant"
                                                             for o in n.output}
        for t in g.initializer:
            self.types.setdefault(t.name, onnx.TypeProto.Tensor(elem_type=t.data_type))
        self.graph_io = {v.name for v in [*g.input, *g.output]}

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        return len(t.shape.dim) if t is not None and t.HasField("shape") else None

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.elem_type if t is not None and t.elem_type else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _given(node: onnx.NodeProto, i: int, outputs: bool = False) -> bool:
    values = node.output if outputs else node.input
    return len(values) > i and bool(values[i])


def _tensor_scatter(node, info) -> str | None:
    ranks = [info.rank(node.input[0]), info.rank(node.input[1])]
    if ranks != [4, 4]:
        return f"past_cache / update are rank {ranks[0]} / {ranks[1]}"
    if _attr(node, "axis", -2) != -2:
        return f"axis = {_attr(node, 'axis')}"
    return None


def _attention(node, info) -> str | None:
    named = {4: "past_key", 5: "past_value", 6: "nonpad_kv_seqlen"}
    given = [name for i, name in named.items() if _given(node, i)]
    given += [name for i, name in {1: "present_key", 2: "present_value"}.items() if _given(node, i, outputs=True)]
    return f"it has {', '.join(given)}" if given else None


def _rotary(node, info) -> str | None:
    if _given(node, 3) and info.elem_type(node.input[3]) not in (None, TensorProto.INT64):
        return f"position_ids are {TensorProto.DataType.Name(info.elem_type(node.input[3]))}"
    rank = info.rank(node.input[0])
    if rank not in (None, 4):
        return f"its input is rank {rank}"
    return None


def _constant_input(i: int, what: str):
    def broken(node, info) -> str | None:
        if _given(node, i) and node.input[i] not in info.constants:
            return f"{what} is computed"
        return None
    return broken


def _dequantize(node, info) -> str | None:
    if _given(node, 2) and node.input[2] in info.constants:
        return None           # a constant zero point; its value is checked by the parser itself
    return "x_zero_point is computed" if _given(node, 2) else None


RULES = (
    Rule("TensorScatter", "past_cache and update 4-D, axis = -2", _tensor_scatter),
    Rule("Attention", "no past_key / past_value / nonpad_kv_seqlen inputs, no present_* outputs", _attention),
    Rule("RotaryEmbedding", "input [B, N, S, H], int64 position_ids", _rotary),
    Rule("Slice", "axes an initializer", _constant_input(3, "axes")),
    Rule("Squeeze", "axes an initializer", _constant_input(1, "axes")),
    Rule("Unsqueeze", "axes a constant", _constant_input(1, "axes")),
    Rule("ReduceMean", "axes an initializer", _constant_input(1, "axes")),
    Rule("Pad", "axes an initializer", _constant_input(3, "axes")),
    Rule("CumSum", "axis an initializer", _constant_input(1, "axis")),
    Rule("DequantizeLinear", "x_zero_point zero (a constant)", _dequantize),
)


def violations(model: onnx.ModelProto) -> list[str]:
    """Every way ``model`` breaks TensorRT's ONNX parser, one line each naming the node."""
    found = []
    opsets = {o.domain or "": o.version for o in model.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None or not OPSETS[0] <= default <= OPSETS[1]:
        found.append(f"opset {default}: TensorRT reads opsets {OPSETS[0]}–{OPSETS[1]}")
    info = _Info(model)
    rules: dict[str, list[Rule]] = {}
    for r in RULES:
        rules.setdefault(r.op, []).append(r)
    for n in model.graph.node:
        label = f"node {n.name or '?'} ({(n.domain + '::') if n.domain else ''}{n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            found.append(f"{label}: domain {n.domain} is not standard ONNX (TensorRT would look for a plugin)")
            continue
        if n.op_type not in SUPPORTED:
            found.append(f"{label}: not an operator TensorRT's parser supports")
            continue
        for r in rules.get(n.op_type, ()):
            why = r.broken(n, info)
            if why:
                found.append(f"{label}: {why}; TensorRT takes {n.op_type} with {r.says}")
    uint8 = [v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == TensorProto.UINT8]
    found += [f"value {name}: UINT8 inside the graph (TensorRT takes UINT8 only as network input or output)"
              for name in uint8 if name not in info.graph_io]
    return found


def check(model: onnx.ModelProto) -> None:
    """Refuse a graph TensorRT's parser would not take, naming each node that breaks a rule."""
    found = violations(model)
    if found:
        shown = "\n  ".join(found[:20]) + (f"\n  … and {len(found) - 20} more" if len(found) > 20 else "")
        raise ExportError(f"the graph breaks {len(found)} of TensorRT's ONNX restrictions:\n  {shown}")


def caches_for_tensorrt(model: onnx.ModelProto, caches: list[tuple[str, str]]) -> list[str]:
    """Lay every in-place cache (graph input ``past`` written by one TensorScatter whose result is
    graph output ``present``) out as TensorRT takes it: 4-D, tokens on axis −2. A 3-D cache
    [B, T, C] becomes [B, 1, T, C]: its update is unsqueezed and every other reader gets the 3-D
    view (a Squeeze). In place on ``model``; returns the caches made 4-D."""
    g = model.graph
    inputs = {v.name: v for v in g.input}
    outputs = {v.name: v for v in g.output}
    axis_name = "_tensorrt_unit_axis"
    changed = []
    for past, present in caches:
        scatters = [n for n in g.node if n.op_type == "TensorScatter" and n.input[0] == past]
        if past not in inputs or len(scatters) != 1 or scatters[0].output[0] != present:
            raise ExportError(f"cache {past} is not written by one TensorScatter that returns {present}: "
                              "the TensorRT profile needs the in-place cache (cache_update='in_place')")
        scatter = scatters[0]
        rank = len(inputs[past].type.tensor_type.shape.dim)
        if rank not in (3, 4):
            raise ExportError(f"cache {past} is rank {rank}: the TensorRT profile lays out rank 3 or 4 caches")
        axis = _attr(scatter, "axis", -2)
        if (rank == 3 and axis % 3 != 1) or (rank == 4 and axis % 4 != 2):
            raise ExportError(f"cache {past} is written on axis {axis}, not its token axis")
        kept = [a for a in scatter.attribute if a.name != "axis"]
        del scatter.attribute[:]
        scatter.attribute.extend([*kept, helper.make_attribute("axis", -2)])
        if rank == 4:
            continue
        if axis_name not in {t.name for t in g.initializer}:
            g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), axis_name))
        new_tokens = scatter.input[1]
        view_in, view_out, update = f"{past}_3d", f"{present}_3d", f"{new_tokens}_4d"
        for n in g.node:                               # other readers of past / present see the 3-D views
            if n is not scatter:
                for i, x in enumerate(n.input):
                    n.input[i] = view_in if x == past else view_out if x == present else x
        for v in (inputs[past], outputs[present]):
            v.type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(dim_value=1))
        scatter.input[1] = update
        g.node.extend([helper.make_node("Squeeze", [past, axis_name], [view_in], name=f"{past}/squeeze"),
                       helper.make_node("Unsqueeze", [new_tokens, axis_name], [update], name=f"{past}/unsqueeze"),
                       helper.make_node("Squeeze", [present, axis_name], [view_out], name=f"{present}/squeeze")])
        stale = {past, present, view_in, view_out, update}
        values = [v for v in g.value_info if v.name not in stale]
        del g.value_info[:]
        g.value_info.extend(values)
        changed.append(past)
    _topological(g)
    return changed


def _topological(g: onnx.GraphProto) -> None:
    from mla_pass.export.fusion.graph import topological
    nodes = topological(list(g.node))
    del g.node[:]
    g.node.extend(nodes)
