"""int8 weights as onnxruntime-genai's int8 build quantizes them: MatMulNBits, 8 bits, symmetric, blocks of 32.

A tied lm_head (traced as MatMul(h, Transpose(E)), which onnxruntime's quantizer skips) gets its
own int8 copy; the embedding stays fp32."""
from __future__ import annotations

import logging
from pathlib import Path

from mla_pass.export.common import quiet

INT8_BLOCK = 32                     # input channels per int8 weight scale


def to_int8_weights(path: Path) -> dict[str, int]:
    """Weight-only int8 (onnxruntime's ``MatMulNBits``, 8 bits, symmetric, one scale per block of
    32 input channels; accuracy level 4 = int8 dot products on CPU), as onnxruntime-genai's
    ``-p int8`` build quantizes (same bits, block, symmetry, accuracy level; its lm_head too, its
    embedding stays fp32). Activations stay float: onnxruntime's dynamic quantization (per-tensor
    uint8 activations) measured top-1 agreement of 42% with the fp32 SmolLM2 on random tokens,
    this 94%. Returns how many weights were quantized and how many tied ones got their own copy."""
    import onnx

    MatMulNBitsQuantizer = import_quantizer()
    model = onnx.load(str(path))
    untied = untie_transposed_weights(model.graph)
    with quiet("root"), quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4)
        quantizer.process()
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    quantized = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
    return {"int8_matmuls": quantized, "untied": untied}


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
