"""How the pass's custom ops are written in ONNX: the exporter's ``custom_translation_table``.

``cache_write`` → ONNX ``TensorScatter``; ``group_query_attention`` → com.microsoft
``GroupQueryAttention``; ``matmul_integer`` → ``MatMulInteger``; ``choose_form`` → a placeholder
node that ``export/branches.py`` turns into an ``If``. onnx knows no schema of the last two
domains, so each gets the part of one that the exporter needs to emit a node.
"""
from __future__ import annotations

import numpy as np
import torch

from mla_pass.export.branches import CHOOSE_FORM


def translations() -> dict:
    """cache_write → ONNX TensorScatter and group_query_attention → com.microsoft
    GroupQueryAttention (onnxruntime updates either in place when past and present are bound to
    the same buffer); matmul_integer → MatMulInteger."""
    from onnxscript import ir, values

    import mla_pass.ops.choose_form  # noqa: F401  (registers mla_pass::choose_form)
    import mla_pass.ops.matmul_integer  # noqa: F401  (registers mla_pass::matmul_integer)

    op24, op18 = values.Opset("", 24), values.Opset("", 18)
    # onnx knows no com.microsoft schemas, and the exporter needs one to emit a node
    gqa_op = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _group_query_attention_schema())
    choose_op = values.Op(values.Opset(CHOOSE_FORM[0], 1), CHOOSE_FORM[1], _choose_form_schema())

    def cache_write(buffer, new, write_index, axis: int):
        return op24.TensorScatter(buffer, new, write_index, axis=axis)

    def group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                              attention_bias, query_seqlens, num_heads: int, kv_num_heads: int, scale: float,
                              softcap: float):
        # do_rotary=0: the graph has already rotated q and k
        return gqa_op(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, None, None, None,
                      attention_bias, None, None, None, None, None, query_seqlens,
                      num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, softcap=softcap)

    def choose_form(x, one_token, prompt):
        # S == 1 as the If's condition; export/branches.py makes the If and its two branches
        # opset 18 ops: the concatenating cache's program is opset 23
        one = op18.Equal(op18.Shape(x, start=1, end=2), op18.Constant(value=ir.tensor(np.array([1], np.int64))))
        return choose_op(one, one_token, prompt)

    def matmul_integer(a, b, a_zero_point: int, b_zero_point: int):
        # a nonzero zero point belongs to a uint8 operand (mla_pass.ops.matmul_integer checks it)
        zp = [op24.Constant(value=ir.tensor(np.array(z, np.uint8))) if z else None
              for z in (a_zero_point, b_zero_point)]
        return op24.MatMulInteger(a, b, *zp)

    return {torch.ops.mla_pass.cache_write.default: cache_write,
            torch.ops.mla_pass.group_query_attention.default: group_query_attention,
            torch.ops.mla_pass.matmul_integer.default: matmul_integer,
            torch.ops.mla_pass.choose_form.default: choose_form}


def _choose_form_schema():
    """A placeholder node (condition, one-token value, prompt value) → value: it never reaches
    onnxruntime, ``export/branches.py`` replaces it by an If."""
    from onnx.defs import OpSchema

    inputs = [OpSchema.FormalParameter("one_token_step", "B"), OpSchema.FormalParameter("one_token", "T"),
              OpSchema.FormalParameter("prompt", "T")]
    return OpSchema(CHOOSE_FORM[1], CHOOSE_FORM[0], 1, inputs=inputs, outputs=[OpSchema.FormalParameter("out", "T")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("B", ["tensor(bool)"], "")])


def _group_query_attention_schema():
    """The part of onnxruntime's GroupQueryAttention signature that ``gqa_op`` uses (inputs in
    onnxruntime's order, up to query_seqlens; the unused optional ones are left empty)."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
             "k_norm_weight", "query_seqlens"]
    types = {"seqlens_k": "M", "total_sequence_length": "M", "query_seqlens": "M", "position_ids": "I",
             "k_scale": "T", "v_scale": "T"}
    inputs = [OpSchema.FormalParameter(n, types.get(n, "T"), param_option=optional if i > 2 and n not in
                                       ("seqlens_k", "total_sequence_length") else OpSchema.FormalParameterOption.Single)
              for i, n in enumerate(names)]
    outputs = [OpSchema.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")]
    attr = OpSchema.AttrType
    attributes = [OpSchema.Attribute("num_heads", attr.INT), OpSchema.Attribute("kv_num_heads", attr.INT),
                  OpSchema.Attribute("scale", attr.FLOAT, required=False),
                  OpSchema.Attribute("softcap", attr.FLOAT, required=False)]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs, attributes=attributes,
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                                      ("I", ["tensor(int64)"], "")])
