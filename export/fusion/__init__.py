"""Fuse the small-op idioms of an exported decoder into onnxruntime's kernels (a pass over ONNX).

``fuse(model) -> (model, counts)`` finds each pattern from the graph's dataflow (op types,
constants, static shapes), never from names or model families, and replaces it by one node
that computes the same function:

- **RMSNorm** ``γ · x · 1/√(mean(x²) + ε)`` (``Pow``/``ReduceMean``/``Add``/``Sqrt``/
  ``Reciprocal``/``Mul``/``Mul``, as ``torch.onnx`` writes ``x * torch.rsqrt(...)``; also
  ``Div(x, Sqrt)`` and ``Mul(x, x)``) → ``SimplifiedLayerNormalization`` (onnxruntime's kernel;
  its schema sits in the default domain). onnxruntime's own fuser does not see the pattern: it
  expects ``Div``, and ``torch.onnx`` writes ``Reciprocal`` + ``Mul``. With ``standard=True``
  it becomes ONNX's own ``RMSNormalization`` (opset 23) instead.
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

from collections import Counter

import onnx

from .graph import MS, Graph, import_domain
from .layout import drop_round_trips
from .matmuls import pack_matmuls
from .norms import NORM_OPS, fuse_rms_norms, fuse_skip_adds
from .rotary import ROTARY_OPSET, fuse_rotaries

FUSIONS = ("rms_norm", "skip_rms_norm", "rotary", "layout", "packed_matmul")
# standard ONNX only (TensorRT): RMSNorm as ONNX's RMSNormalization; no com.microsoft Skip*, and no
# RotaryEmbedding, which TensorRT takes on [B, N, S, H] only while the fusion rotates [B, S, H·D]
STANDARD_FUSIONS = ("rms_norm", "layout", "packed_matmul")


def fuse(model: onnx.ModelProto, only: tuple[str, ...] = FUSIONS,
         standard: bool = False) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` with the patterns above fused; ``counts[name]`` = sites fused.

    ``only`` picks a subset of ``FUSIONS`` (``skip_rms_norm`` works on the ``rms_norm`` result).
    ``standard``: emit standard ONNX ops only (``only`` ⊆ ``STANDARD_FUSIONS``; the norm becomes
    ``RMSNormalization``).
    """
    unknown = set(only) - set(FUSIONS)
    if unknown:
        raise ValueError(f"unknown fusions {sorted(unknown)}: choose from {FUSIONS}")
    if standard and set(only) - set(STANDARD_FUSIONS):
        raise ValueError(f"fusions {sorted(set(only) - set(STANDARD_FUSIONS))} emit non-standard ops: with "
                         f"standard=True choose from {STANDARD_FUSIONS}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counts = dict.fromkeys(FUSIONS, 0)
    graph = Graph(out.graph)
    if "rms_norm" in only:
        counts["rms_norm"] = fuse_rms_norms(graph, NORM_OPS[1] if standard else NORM_OPS[0])
    if "skip_rms_norm" in only:
        counts["skip_rms_norm"] = fuse_skip_adds(graph)
    if "rotary" in only:
        counts["rotary"] = fuse_rotaries(graph)
    if "layout" in only:
        counts["layout"] = drop_round_trips(graph)
    if "packed_matmul" in only:
        counts["packed_matmul"] = pack_matmuls(graph)
    graph.commit()
    if counts["skip_rms_norm"]:
        import_domain(out, MS, 1)
    if counts["rotary"]:
        import_domain(out, "", ROTARY_OPSET)
    return out, counts


def op_counts(model: onnx.ModelProto) -> Counter:
    """Nodes per op type (``domain::op`` for non-default domains)."""
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


# -- RMSNorm ----------------------------------------------------------------------------------


# -- residual add + RMSNorm -------------------------------------------------------------------


# -- RoPE -------------------------------------------------------------------------------------


# -- layout round trips -------------------------------------------------------------------------


# -- sibling projections ---------------------------------------------------------------------------


