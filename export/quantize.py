"""Weight-only int8 / int4 as onnxruntime-genai's ``-p int8`` / ``-p int4`` builds quantize:
MatMulNBits, symmetric, blocks of 32 input channels, accuracy level 4 (int8 dot products on CPU).

Those are genai 0.18's defaults for the CPU execution provider (``QuantConfig.from_extra_options``:
block_size 32, is_symmetric True, accuracy_level 4 on cpu/webgpu, round-to-nearest, MatMul only,
``shared_embeddings`` off). A tied lm_head (traced as MatMul(h, Transpose(E)), which onnxruntime's
quantizer skips) gets its own quantized copy; the embedding stays fp32, as in genai's builds."""
from __future__ import annotations

import logging
from pathlib import Path

from mla_pass.export.common import quiet

WEIGHT_BLOCK = 32                   # input channels per weight scale
WEIGHT_BITS = {"int8": 8, "int4": 4}
MAX_ROUNDING = {"int8": 0.1, "int4": 0.5}     # relative RMS error of a weight's codes (another weight's: ≈ 1.4)


def quantize_weights(path: Path, precision: str) -> dict[str, int]:
    """Weight-only ``precision`` ("int8" or "int4") for every MatMul of the model at ``path``, in place:
    onnxruntime's ``MatMulNBits`` with one symmetric scale per block of 32 input channels and
    accuracy level 4, as onnxruntime-genai's build of that precision (its lm_head too, its
    embedding fp32). Activations stay float: onnxruntime's dynamic quantization (per-tensor uint8
    activations) measured top-1 agreement of 42% with the fp32 SmolLM2 on random tokens, int8
    weights 94%. Returns how many weights were quantized and how many tied ones got their own copy."""
    import onnx

    if precision not in WEIGHT_BITS:
        raise ValueError(f"weights are quantized to one of {sorted(WEIGHT_BITS)}, got {precision!r}")
    MatMulNBitsQuantizer = import_quantizer()
    model = onnx.load(str(path))
    untied = untie_transposed_weights(model.graph)
    before = onnx.GraphProto.FromString(model.graph.SerializeToString())
    with quiet("root"), quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        quantizer = MatMulNBitsQuantizer(model, bits=WEIGHT_BITS[precision], block_size=WEIGHT_BLOCK,
                                         is_symmetric=True, accuracy_level=4)
        quantizer.process()
    # the codes must stand for the weights they replaced (the export check's reference is built
    # from them): round to nearest moves a weight by ~0.09 of its RMS at 4 bits, ~0.005 at 8
    rounding = _worst_rounding(before, quantizer.model.model.graph)
    if not rounding <= MAX_ROUNDING[precision]:
        raise ValueError(f"{precision} weights: a quantized weight is off by {rounding:.2f} of its RMS "
                         f"(allowed {MAX_ROUNDING[precision]}); the quantizer wrote codes for another weight")
    del before
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    quantized = _count(quantizer.model.model.graph, "MatMulNBits")
    return {f"{precision}_matmuls": quantized, "untied": untied, "worst_weight_rounding": round(rounding, 4)}


def import_quantizer():
    """onnxruntime's ``MatMulNBitsQuantizer``, imported without its side effect: the module calls
    ``logging.basicConfig(level=INFO)``, after which every later export in the process printed
    hundreds of onnxscript INFO lines through the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    root.handlers[:], root.level = handlers, level
    return MatMulNBitsQuantizer


def untie_transposed_weights(graph) -> int:
    """Give every ``MatMul(x, Transpose(W))`` over a float initializer W its own transposed copy.

    A tied lm_head is traced as ``logits = h · Transpose(E)`` over the embedding E that the
    token Gather also reads; ``MatMulNBitsQuantizer`` only quantizes a MatMul whose weight is an
    initializer, so without this the largest matrix of a small model (SmolLM2: 49,152 × 576)
    stayed fp32. E itself stays for the Gather (the quantizer's Gather is 4-bit only), so the
    lm_head costs an int8 copy on disk (SmolLM2: 28 MB of codes + 3.5 MB of scales). Returns
    the number of MatMuls rewired."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    rewired, copies = 0, {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        weight = inits[t.input[0]]
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        if len(weight.dims) != 2 or perm not in ([], [[1, 0]]) or \
                weight.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        if t.output[0] not in copies:
            name = f"{weight.name}.transposed"
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), name))
            copies[t.output[0]] = name
        node.input[1] = copies[t.output[0]]
        readers[t.output[0]] -= 1
        rewired += 1
    outputs = {o.name for o in graph.output}
    for out in copies:                # a Transpose nobody reads any more
        if readers[out] == 0 and out not in outputs:
            graph.node.remove(producers[out])
    return rewired


def dequantized_weights(model):
    """A copy of ``model`` (an ``onnx.ModelProto`` with its weights loaded) in which every
    ``MatMulNBits`` is a ``MatMul`` over the float weights its codes stand for (``float_weight``).
    The export check runs it as the reference of the quantized program, so what it judges is the
    program, not the quality of 4-bit rounding (``verify.check_export``); ``quantize_weights``
    checks that those weights are the ones quantized."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())

    def rewrite(graph, outer: dict) -> None:
        inits = outer | {t.name: t for t in graph.initializer}
        nodes = list(graph.node)
        del graph.node[:]
        for node in nodes:
            for g in _subgraphs(node):
                rewrite(g, inits)
            if node.op_type != "MatMulNBits":
                graph.node.append(node)
                continue
            name = f"{node.input[1]}.dequantized"
            graph.initializer.append(numpy_helper.from_array(float_weight(node, inits), name))
            biased = len(node.input) > 5 and node.input[5]
            out = f"{node.output[0]}.unbiased" if biased else node.output[0]
            graph.node.append(helper.make_node("MatMul", [node.input[0], name], [out], name=node.name))
            if biased:
                graph.node.append(helper.make_node("Add", [out, node.input[5]], node.output[:1]))

    rewrite(model.graph, {})
    return model


def float_weight(node, initializers: dict):
    """The [K, N] float weight a ``MatMulNBits`` node's codes stand for: code minus the symmetric
    zero point (2^(bits−1)) times its block's scale, 4-bit codes two a byte, low nibble first."""
    import numpy as np
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    if len(node.input) > 3 and any(node.input[3:5]):
        raise ValueError(f"{node.name}: zero points or g_idx are not what quantize_weights writes")
    codes = numpy_helper.to_array(initializers[node.input[1]]).reshape(n, -1)
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(n, -1)
    blocks = -(-k // block)
    scales = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32).reshape(n, blocks, 1)
    w = (codes.reshape(n, blocks, block).astype(np.float32) - 2 ** (bits - 1)) * scales
    return w.reshape(n, -1)[:, :k].T.copy()


def _worst_rounding(before, after) -> float:
    """The largest relative RMS error (against the weight's RMS) of any weight ``after`` quantized
    from ``before`` (both ``onnx.GraphProto``; a MatMul's output names its MatMulNBits)."""
    import numpy as np
    from onnx import numpy_helper

    weights = {node.output[0]: inits[node.input[1]] for node, inits in _nodes_in_scope(before)
               if node.op_type == "MatMul" and node.input[1] in inits}       # read one at a time below
    worst = 0.0
    for node, inits in _nodes_in_scope(after):
        w = weights.get(node.output[0]) if node.op_type == "MatMulNBits" else None
        if w is not None:
            w = numpy_helper.to_array(w)
            err = float(np.sqrt(np.mean((float_weight(node, inits) - w) ** 2) / max(np.mean(w ** 2), 1e-30)))
            worst = max(worst, err)
    return worst


def _nodes_in_scope(graph, outer: dict | None = None):
    """(node, the initializers it can read) for every node of ``graph`` and of its subgraphs."""
    inits = (outer or {}) | {t.name: t for t in graph.initializer}
    for node in graph.node:
        for g in _subgraphs(node):
            yield from _nodes_in_scope(g, inits)
        yield node, inits


def _subgraphs(node) -> list:
    return [g for a in node.attribute for g in [*a.graphs, *([a.g] if a.HasField("g") else [])]]


def _count(graph, op_type: str) -> int:
    """Nodes of ``op_type`` in ``graph`` and its subgraphs (the branches of a site's If)."""
    return sum((n.op_type == op_type) + sum(_count(g, op_type) for g in _subgraphs(n)) for n in graph.node)
