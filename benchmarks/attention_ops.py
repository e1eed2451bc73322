"""One decode step of one attention layer, in each ONNX formulation we tried (a benchmark, not a test).

Issue 3 asks where the absorbed attention's speed is won: op choice, layout, the rope part. This
builds single-layer ONNX graphs with SmolLM2-135M's shapes (9 query heads, 3 kv heads, head 64;
MLA latent c, 2r rope dims per kv head), binds a cache of ``past`` tokens with IO binding (updated
in place where the op allows), and times one S=1 step in onnxruntime on CPU:

- ``gqa-original``: com.microsoft ``GroupQueryAttention`` over the full K/V cache (what
  onnxruntime-genai uses) — the yardstick;
- ``attention-original``: the ONNX ``Attention`` op (opset 23) over the same cache;
- ``attention-mla``: the absorbed form as ``Attention`` with one kv head (keys = values = latent),
  rope scores + mask as an additive bias (the previous export, SDPA form);
- ``gqa-mla``: the same with ``GroupQueryAttention`` (kv_num_heads=1, past_key and past_value bound
  to one latent buffer), rope scores as ``attention_bias``;
- ``matmul-mla``: heads as rows — scores [B,H,T] = q_latent [B,H,C] · latentᵀ as one GEMM per
  batch row (the latent is read once for all heads), + rope bias, Softmax, · latent.

    python benchmarks/attention_ops.py --past 8192 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

H, HKV, D = 9, 3, 64
F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializer=(), opset=23):
    graph = helper.make_graph(nodes, "attn", inputs, outputs, initializer=list(initializer))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def gqa_original(max_t):
    nodes = [helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"],
                              ["out", "present_k", "present_v"], domain="com.microsoft",
                              num_heads=H, kv_num_heads=HKV)]
    inputs = [vi("q", ["B", 1, H * D]), vi("k", ["B", 1, HKV * D]), vi("v", ["B", 1, HKV * D]),
              vi("past_k", ["B", HKV, max_t, D]), vi("past_v", ["B", HKV, max_t, D]),
              vi("seqlens_k", ["B"], TensorProto.INT32), vi("total", [], TensorProto.INT32)]
    outputs = [vi("out", ["B", 1, H * D]), vi("present_k", ["B", HKV, max_t, D]), vi("present_v", ["B", HKV, max_t, D])]
    return _model(nodes, inputs, outputs)


def attention_original(t):
    nodes = [helper.make_node("Attention", ["q", "k", "v", "mask"], ["out"], q_num_heads=H, kv_num_heads=HKV)]
    inputs = [vi("q", ["B", H, 1, D]), vi("k", ["B", HKV, t, D]), vi("v", ["B", HKV, t, D]), vi("mask", ["B", 1, 1, t])]
    return _model(nodes, inputs, [vi("out", ["B", H, 1, D])])


def _rope_bias_nodes(c, r2):
    """bias [B,H,1,T] = q_rope [B,Hkv,g,2r] @ k_ropeᵀ [B,Hkv,2r,T] (reshaped) + mask [B,1,1,T]."""
    return [helper.make_node("MatMul", ["q_rope", "k_rope_t"], ["rope_s"]),
            helper.make_node("Reshape", ["rope_s", "bias_shape"], ["rope_b"]),
            helper.make_node("Add", ["rope_b", "mask"], ["bias"])]


def _rope_inputs(t, r2):
    return [vi("q_rope", ["B", HKV, H // HKV, r2]), vi("k_rope_t", ["B", HKV, r2, t]), vi("mask", ["B", 1, 1, t])]


def attention_mla(t, c, r2):
    shape = helper.make_tensor("bias_shape", TensorProto.INT64, [4], [0, H, 1, -1])
    nodes = _rope_bias_nodes(c, r2) + [
        helper.make_node("Attention", ["q", "latent", "latent", "bias"], ["out"], q_num_heads=H, kv_num_heads=1)]
    return _model(nodes, [vi("q", ["B", H, 1, c]), vi("latent", ["B", 1, t, c])] + _rope_inputs(t, r2),
                  [vi("out", ["B", H, 1, c])], [shape])


def gqa_mla(t, c, r2, max_t):
    shape = helper.make_tensor("bias_shape", TensorProto.INT64, [4], [0, H, 1, -1])
    nodes = _rope_bias_nodes(c, r2) + [
        helper.make_node("GroupQueryAttention", ["q", "k", "k", "past", "past", "seqlens_k", "total", "", "", "", "bias"],
                         ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=H, kv_num_heads=1,
                         scale=0.125)]
    inputs = [vi("q", ["B", 1, H * c]), vi("k", ["B", 1, c]), vi("past", ["B", 1, max_t, c]),
              vi("seqlens_k", ["B"], TensorProto.INT32), vi("total", [], TensorProto.INT32)] + _rope_inputs(t, r2)
    outputs = [vi("out", ["B", 1, H * c]), vi("present_k", ["B", 1, max_t, c]), vi("present_v", ["B", 1, max_t, c])]
    return _model(nodes, inputs, outputs, [shape])


def matmul_mla(t, c, r2):
    shape = helper.make_tensor("bias_shape", TensorProto.INT64, [3], [0, H, -1])
    nodes = [helper.make_node("MatMul", ["q_rope", "k_rope_t"], ["rope_s"]),
             helper.make_node("Reshape", ["rope_s", "bias_shape"], ["rope_b"]),
             helper.make_node("Add", ["rope_b", "mask"], ["bias"]),
             helper.make_node("Transpose", ["latent"], ["latent_t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "latent_t"], ["s"]),            # [B,H,T]; fused to transB by ORT
             helper.make_node("Add", ["s", "bias"], ["sb"]),
             helper.make_node("Softmax", ["sb"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "latent"], ["out"])]           # [B,H,C]
    inputs = [vi("q", ["B", H, c]), vi("latent", ["B", t, c]), vi("q_rope", ["B", HKV, H // HKV, r2]),
              vi("k_rope_t", ["B", HKV, r2, t]), vi("mask", ["B", 1, t])]
    return _model(nodes, inputs, [vi("out", ["B", H, c])], [shape])


def matmul_mla_channels_first(t, c, r2):
    """The latent cached as [B, C, T]: scores = q · L and out = (L · pᵀ)ᵀ are plain MatMuls over
    the cache; only the small [H, T] weights are transposed."""
    shape = helper.make_tensor("bias_shape", TensorProto.INT64, [3], [0, H, -1])
    nodes = [helper.make_node("MatMul", ["q_rope", "k_rope_t"], ["rope_s"]),
             helper.make_node("Reshape", ["rope_s", "bias_shape"], ["rope_b"]),
             helper.make_node("Add", ["rope_b", "mask"], ["bias"]),
             helper.make_node("MatMul", ["q", "latent_ct"], ["s"]),           # [B,H,T]
             helper.make_node("Add", ["s", "bias"], ["sb"]),
             helper.make_node("Softmax", ["sb"], ["p"], axis=-1),
             helper.make_node("Transpose", ["p"], ["p_t"], perm=[0, 2, 1]),  # [B,T,H]
             helper.make_node("MatMul", ["latent_ct", "p_t"], ["out_t"]),    # [B,C,H]
             helper.make_node("Transpose", ["out_t"], ["out"], perm=[0, 2, 1])]
    inputs = [vi("q", ["B", H, c]), vi("latent_ct", ["B", c, t]), vi("q_rope", ["B", HKV, H // HKV, r2]),
              vi("k_rope_t", ["B", HKV, r2, t]), vi("mask", ["B", 1, t])]
    return _model(nodes, inputs, [vi("out", ["B", H, c])], [shape])


def export_mla(t, c, r2, variant="adds"):
    """The heads-as-rows layer as the exporter writes it: rope keys cached [B,Hkv,T,2r] (read
    transposed), ``variant``: "adds" (scores + rope, + mask: two passes, as exported), "sum" (one
    ``Sum`` of the three), "rope-t" (rope scores as k_rope·q_ropeᵀ → [B,Hkv,T,g], then a transpose
    of that small result, plus "sum"), "joint" (latent and rope keys cached as one [B,T,C+Hkv·2r]
    tensor; the query carries each head's rope part in its kv group's slots, zeros elsewhere:
    one GEMM for all scores, the output GEMM reads the rope columns too and drops them)."""
    shape = helper.make_tensor("bias_shape", TensorProto.INT64, [3], [0, H, -1])
    if variant == "joint":
        w = c + HKV * r2
        starts, ends, axes = (helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in
                              (("st", 0), ("en", c), ("ax", 2)))
        nodes = [helper.make_node("Transpose", ["joint"], ["joint_t"], perm=[0, 2, 1]),
                 helper.make_node("MatMul", ["q", "joint_t"], ["s"]),
                 helper.make_node("Add", ["s", "mask"], ["sb"]),
                 helper.make_node("Softmax", ["sb"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "joint"], ["o"]),
                 helper.make_node("Slice", ["o", "st", "en", "ax"], ["out"])]
        inputs = [vi("q", ["B", H, w]), vi("joint", ["B", t, w]), vi("mask", ["B", 1, t])]
        return _model(nodes, inputs, [vi("out", ["B", H, c])], [starts, ends, axes])
    if variant == "rope-t":
        rope = [helper.make_node("Transpose", ["q_rope"], ["q_rope_t"], perm=[0, 1, 3, 2]),
                helper.make_node("MatMul", ["k_rope", "q_rope_t"], ["rope_tg"]),          # [B,Hkv,T,g]
                helper.make_node("Transpose", ["rope_tg"], ["rope_s"], perm=[0, 1, 3, 2])]
    else:
        rope = [helper.make_node("Transpose", ["k_rope"], ["k_rope_t"], perm=[0, 1, 3, 2]),
                helper.make_node("MatMul", ["q_rope", "k_rope_t"], ["rope_s"])]
    nodes = rope + [helper.make_node("Reshape", ["rope_s", "bias_shape"], ["rope_b"]),
                    helper.make_node("Transpose", ["latent"], ["latent_t"], perm=[0, 2, 1]),
                    helper.make_node("MatMul", ["q", "latent_t"], ["s"])]
    if variant == "adds":
        nodes += [helper.make_node("Add", ["s", "rope_b"], ["s1"]), helper.make_node("Add", ["s1", "mask"], ["sb"])]
    else:
        nodes += [helper.make_node("Sum", ["s", "rope_b", "mask"], ["sb"])]
    nodes += [helper.make_node("Softmax", ["sb"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "latent"], ["out"])]
    inputs = [vi("q", ["B", H, c]), vi("latent", ["B", t, c]), vi("q_rope", ["B", HKV, H // HKV, r2]),
              vi("k_rope", ["B", HKV, t, r2]), vi("mask", ["B", 1, t])]
    return _model(nodes, inputs, [vi("out", ["B", H, c])], [shape])


EXPORT_FORMS = ("adds", "sum", "rope-t", "joint")
STACKABLE = {"matmul-mla", *(f"export-{v}" for v in EXPORT_FORMS)}      # + INT8_FORMS (below)


def _scalar(name, value, dtype=F):
    return helper.make_tensor(name, dtype, [], [value])


def _latent_scale_nodes():
    """scale [B,T] → scale_u [B,1,T] (per key, for scores and weights)."""
    return [helper.make_node("Unsqueeze", ["scale", "ax1"], ["scale_u"])]


def int8_cast_mla(t, c, r2):
    """The int8 latent cache as exported before: cast to fp32 every step, scales folded into
    scores and weights, then the fp32 heads-as-rows form."""
    shape = helper.make_tensor("bias_shape", TensorProto.INT64, [3], [0, H, -1])
    ax1 = helper.make_tensor("ax1", TensorProto.INT64, [1], [1])
    nodes = _rope_bias_nodes(c, r2)[:1] + [
        helper.make_node("Reshape", ["rope_s", "bias_shape"], ["rope_b"]),
        helper.make_node("Add", ["rope_b", "mask"], ["bias"]),
        *_latent_scale_nodes(),
        helper.make_node("Cast", ["latent"], ["lf"], to=F),
        helper.make_node("Transpose", ["lf"], ["lf_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "lf_t"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale_u"], ["s"]),
        helper.make_node("Add", ["s", "bias"], ["sb"]),
        helper.make_node("Softmax", ["sb"], ["p0"], axis=-1),
        helper.make_node("Mul", ["p0", "scale_u"], ["p"]),
        helper.make_node("MatMul", ["p", "lf"], ["out"])]
    inputs = [vi("q", ["B", H, c]), vi("latent", ["B", t, c], TensorProto.INT8), vi("scale", ["B", t]),
              vi("q_rope", ["B", HKV, H // HKV, r2]), vi("k_rope_t", ["B", HKV, r2, t]), vi("mask", ["B", 1, t])]
    return _model(nodes, inputs, [vi("out", ["B", H, c])], [shape, ax1])


def u8_integer_mla(t, c, r2, q_digits=1, w_digits=1, weights="int", combine="ops"):
    """Integer attention over a uint8 latent cache (codes + 128, one scale per token).

    scores: the query is quantized per head (``q_digits=1``: int8, scale max/127; ``2``: plus
    the int8 remainder at 1/254 of that step, stacked as 2H columns: ~15 bits), and
    ``latent [B,T,C] · q_codesᵀ [B,C,H|2H]`` is one MatMulInteger (u8×s8, zero point 128; the
    cache is the GEMM's A, read as stored), giving [B,T,H] int32 → × query scale × key scale,
    transposed to [B,H,T].
    output: the weights × key scales are quantized per row (``w_digits=1``: uint8, scale
    rowmax/255; ``2``: a 7-bit digit at rowmax/127 and the remainder at 1/254 of it, both with
    zero point 128, stacked as 2H rows: ~15 bits), ``P_codes · latent`` is one MatMulInteger
    (u8×u8), then × the row scale. ``weights="float"``: the output in fp32 over the cast cache."""
    shape = helper.make_tensor("bias_shape", TensorProto.INT64, [3], [0, H, -1])
    ax1 = helper.make_tensor("ax1", TensorProto.INT64, [1], [1])
    axm1 = helper.make_tensor("axm1", TensorProto.INT64, [1], [-1])
    consts = [shape, ax1, axm1, _scalar("zp", 128, TensorProto.UINT8), _scalar("c127", 127.0),
              _scalar("c255", 255.0), _scalar("tiny", 1e-30), _scalar("c254", 254.0), _scalar("c128f", 128.0)]
    nodes = [helper.make_node("MatMul", ["q_rope", "k_rope_t"], ["rope_s"]),
             helper.make_node("Reshape", ["rope_s", "bias_shape"], ["rope_b"]),
             helper.make_node("Add", ["rope_b", "mask"], ["bias"]),
             *_latent_scale_nodes(),
             # query → int8 per head
             helper.make_node("Abs", ["q"], ["qa"]),
             helper.make_node("ReduceMax", ["qa", "axm1"], ["qm0"], keepdims=1),       # [B,H,1]
             helper.make_node("Max", ["qm0", "tiny"], ["qm"]),
             helper.make_node("Div", ["qm", "c127"], ["sq"]),
             helper.make_node("Div", ["q", "sq"], ["qn"]),
             helper.make_node("Round", ["qn"], ["qr"])]
    if q_digits == 1:
        nodes += [helper.make_node("Cast", ["qr"], ["qcodes"], to=TensorProto.INT8)]
    else:
        nodes += [helper.make_node("Sub", ["qn", "qr"], ["qres"]),                       # [-1/2, 1/2]
                  helper.make_node("Mul", ["qres", "c254"], ["qres2"]),
                  helper.make_node("Round", ["qres2"], ["qlo"]),
                  helper.make_node("Concat", ["qr", "qlo"], ["q2"], axis=1),            # [B,2H,C]
                  helper.make_node("Cast", ["q2"], ["qcodes"], to=TensorProto.INT8)]
    nodes += [helper.make_node("Transpose", ["qcodes"], ["qi_t"], perm=[0, 2, 1]),      # [B,C,H|2H]
              helper.make_node("MatMulInteger", ["latent", "qi_t", "zp", ""], ["si"]),  # [B,T,H|2H] int32
              helper.make_node("Cast", ["si"], ["sf"], to=F)]
    if q_digits == 2 and combine == "matmul":
        # digits, query scale and the transpose in one small GEMM: [B,H,2H]·sfᵀ → [B,H,T]
        eye = np.eye(H, dtype=np.float32)
        consts.append(helper.make_tensor("digits", F, [H, 2 * H], np.concatenate([eye, eye / 254], 1).ravel()))
        nodes += [helper.make_node("Mul", ["sq", "digits"], ["comb"]),
                  helper.make_node("Transpose", ["sf"], ["sf_t"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["comb", "sf_t"], ["s1"])]
    else:
        if q_digits == 2:
            nodes += [helper.make_node("Split", ["sf"], ["s_hi", "s_lo"], axis=2, num_outputs=2),
                      helper.make_node("Div", ["s_lo", "c254"], ["s_lo2"]),
                      helper.make_node("Add", ["s_hi", "s_lo2"], ["sf1"])]
        else:
            nodes += [helper.make_node("Identity", ["sf"], ["sf1"])]
        nodes += [helper.make_node("Transpose", ["sf1"], ["sft"], perm=[0, 2, 1]),           # [B,H,T]
                  helper.make_node("Mul", ["sft", "sq"], ["s1"])]
    nodes += [helper.make_node("Mul", ["s1", "scale_u"], ["s"]),
              helper.make_node("Add", ["s", "bias"], ["sb"]),
              helper.make_node("Softmax", ["sb"], ["p0"], axis=-1),
              helper.make_node("Mul", ["p0", "scale_u"], ["p"])]
    if weights == "float":
        nodes += [helper.make_node("Cast", ["latent"], ["lu"], to=F),
                  helper.make_node("Sub", ["lu", "c128f"], ["lf"]),
                  helper.make_node("MatMul", ["p", "lf"], ["out"])]
    else:
        nodes += [helper.make_node("ReduceMax", ["p", "axm1"], ["pm0"], keepdims=1),   # [B,H,1]
                  helper.make_node("Max", ["pm0", "tiny"], ["pm"]),
                  helper.make_node("Flatten", ["p"], ["p2"], axis=2),                  # [B·H, T]
                  helper.make_node("Shape", ["p"], ["pshape"])]
        if w_digits == 1:
            nodes += [helper.make_node("Div", ["pm", "c255"], ["sp"]),
                      helper.make_node("Reshape", ["sp", "axm1"], ["sp1"]),            # [B·H]
                      helper.make_node("QuantizeLinear", ["p2", "sp1"], ["pq2"], axis=0),
                      helper.make_node("Reshape", ["pq2", "pshape"], ["pq"]),
                      helper.make_node("MatMulInteger", ["pq", "latent", "", "zp"], ["oi"]),
                      helper.make_node("Cast", ["oi"], ["of"], to=F),
                      helper.make_node("Mul", ["of", "sp"], ["out"])]
        else:   # two digits, zero point 128 for both (MatMulInteger takes one zero point for A)
            nodes += [helper.make_node("Div", ["pm", "c127"], ["sp"]),
                      helper.make_node("Reshape", ["sp", "axm1"], ["sp1"]),
                      helper.make_node("Div", ["sp1", "c254"], ["sp1lo"]),
                      helper.make_node("Expand", ["zp", "spshape"], ["zps"]),
                      helper.make_node("Shape", ["sp1"], ["spshape"]),
                      helper.make_node("QuantizeLinear", ["p2", "sp1", "zps"], ["hi2"], axis=0),
                      helper.make_node("DequantizeLinear", ["hi2", "sp1", "zps"], ["hid"], axis=0),
                      helper.make_node("Sub", ["p2", "hid"], ["res"]),
                      helper.make_node("QuantizeLinear", ["res", "sp1lo", "zps"], ["lo2"], axis=0),
                      helper.make_node("Reshape", ["hi2", "pshape"], ["hi"]),
                      helper.make_node("Reshape", ["lo2", "pshape"], ["lo"]),
                      helper.make_node("Concat", ["hi", "lo"], ["hl"], axis=1),        # [B,2H,T]
                      helper.make_node("MatMulInteger", ["hl", "latent", "zp", "zp"], ["oi"]),
                      helper.make_node("Cast", ["oi"], ["of"], to=F),
                      helper.make_node("Split", ["of"], ["ohi", "olo"], axis=1, num_outputs=2),
                      helper.make_node("Div", ["olo", "c254"], ["olo2"]),
                      helper.make_node("Add", ["ohi", "olo2"], ["osum"]),
                      helper.make_node("Mul", ["osum", "sp"], ["out"])]
    inputs = [vi("q", ["B", H, c]), vi("latent", ["B", t, c], TensorProto.UINT8), vi("scale", ["B", t]),
              vi("q_rope", ["B", HKV, H // HKV, r2]), vi("k_rope_t", ["B", HKV, r2, t]), vi("mask", ["B", 1, t])]
    return _model(_topo(nodes), inputs, [vi("out", ["B", H, c])], consts)


def _topo(nodes):
    """Nodes in an order where every input is produced first (builders append freely)."""
    made = {i for n in nodes for i in n.input} - {o for n in nodes for o in n.output}
    out, left = [], list(nodes)
    while left:
        n = next(n for n in left if all(i in made or i == "" for i in n.input))
        out.append(n)
        made.update(n.output)
        left.remove(n)
    return out


def stacked(model_bytes, layers: int, per_layer: tuple[str, ...]):
    """``layers`` copies of a one-layer graph in one model, each with its own copy of the inputs in
    ``per_layer`` (the caches) and its own output: the caches of all layers no longer fit the CPU
    caches, as in a whole model at long context. Inputs not in ``per_layer`` are shared."""
    one = onnx.load_from_string(model_bytes)
    g = one.graph
    shared = {i.name for i in g.input if i.name not in per_layer} | {t.name for t in g.initializer}
    nodes, outputs, inputs = [], [], [i for i in g.input if i.name in shared]
    for k in range(layers):
        def rename(n, k=k):
            return n if n in shared or n == "" else f"{n}_{k}"
        for idx, n in enumerate(g.node):
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[:] = [rename(x) for x in n.input]
            m.output[:] = [rename(x) for x in n.output]
            m.name = f"{n.name or n.op_type}_{idx}_{k}"
            nodes.append(m)
        for i in g.input:
            if i.name in per_layer:
                j = onnx.ValueInfoProto()
                j.CopyFrom(i)
                j.name = f"{i.name}_{k}"
                inputs.append(j)
        for o in g.output:
            j = onnx.ValueInfoProto()
            j.CopyFrom(o)
            j.name = f"{o.name}_{k}"
            outputs.append(j)
    graph = helper.make_graph(nodes, "attn_layers", inputs, outputs, initializer=list(g.initializer))
    m = helper.make_model(graph, opset_imports=list(one.opset_import))
    m.ir_version = one.ir_version
    return m.SerializeToString()


def per_layer_feeds(feeds: dict, layers: int, per_layer: tuple[str, ...]) -> dict:
    """Each layer's cache inputs: distinct copies (so each is read from memory)."""
    out = {k: v for k, v in feeds.items() if k not in per_layer}
    for k in range(layers):
        out.update({f"{n}_{k}": feeds[n].copy() for n in per_layer})
    return out


def session(model_bytes, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


COLD = {"scratch": None}     # --cold: a buffer larger than the last-level cache, rewritten between steps


def time_binding(sess, binding, steps):
    sess.run_with_iobinding(binding)
    times = []
    for _ in range(steps):
        if COLD["scratch"] is not None:      # in a whole model the other 29 layers evict this one's cache
            COLD["scratch"].sum()              # clean lines: no write-back during the timed step
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_layers(model_bytes, feeds, per_layer, layers, threads, steps):
    """ms per layer of one step over ``layers`` stacked copies (1: the one-layer graph itself)."""
    if layers > 1:
        model_bytes, feeds = stacked(model_bytes, layers, per_layer), per_layer_feeds(feeds, layers, per_layer)
    s = session(model_bytes, threads)
    return time_binding(s, bind(s, feeds, {o.name: None for o in s.get_outputs()}), steps) / layers


def bind(sess, feeds: dict, outputs: dict):
    b = sess.io_binding()
    for name, arr in feeds.items():
        b.bind_ortvalue_input(name, arr if isinstance(arr, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(arr))
    for name, val in outputs.items():
        if val is None:
            b.bind_output(name)
        else:
            b.bind_ortvalue_output(name, val)
    return b


def run(past, c, r2, threads, steps, batch=1, only=None, layers=1):
    rng = np.random.default_rng(0)
    t = past + 1
    max_t = past + 64
    rnd = lambda *s: rng.standard_normal(s, dtype=np.float32)
    mask = np.zeros((batch, 1, 1, t), np.float32)
    results = {}
    want = lambda name: only is None or name in only

    kc = ort.OrtValue.ortvalue_from_numpy(rnd(batch, HKV, max_t, D))
    vc = ort.OrtValue.ortvalue_from_numpy(rnd(batch, HKV, max_t, D))
    if want("gqa-original") and layers == 1:
        s = session(gqa_original(max_t), threads)
        b = bind(s, {"q": rnd(batch, 1, H * D), "k": rnd(batch, 1, HKV * D), "v": rnd(batch, 1, HKV * D),
                     "past_k": kc, "past_v": vc, "seqlens_k": np.full(batch, past, np.int32),
                     "total": np.array(t, np.int32)}, {"out": None, "present_k": kc, "present_v": vc})
        results["gqa-original"] = time_binding(s, b, steps)

    if want("attention-original") and layers == 1:
        s = session(attention_original(t), threads)
        b = bind(s, {"q": rnd(batch, H, 1, D), "k": rnd(batch, HKV, t, D), "v": rnd(batch, HKV, t, D), "mask": mask}, {"out": None})
        results["attention-original"] = time_binding(s, b, steps)

    rope = {"q_rope": rnd(batch, HKV, H // HKV, r2), "k_rope_t": rnd(batch, HKV, r2, t), "mask": mask}
    if want("attention-mla") and layers == 1:
        s = session(attention_mla(t, c, r2), threads)
        b = bind(s, {"q": rnd(batch, H, 1, c), "latent": rnd(batch, 1, t, c), **rope}, {"out": None})
        results["attention-mla"] = time_binding(s, b, steps)

    lat = ort.OrtValue.ortvalue_from_numpy(rnd(batch, 1, max_t, c))
    if want("gqa-mla") and layers == 1:
        s = session(gqa_mla(t, c, r2, max_t), threads)
        b = bind(s, {"q": rnd(batch, 1, H * c), "k": rnd(batch, 1, c), "past": lat, "seqlens_k": np.full(batch, past, np.int32),
                     "total": np.array(t, np.int32), **rope}, {"out": None, "present_k": lat, "present_v": lat})
        results["gqa-mla"] = time_binding(s, b, steps)

    if want("matmul-mla"):
        feeds = {"q": rnd(batch, H, c), "latent": rnd(batch, t, c), "q_rope": rope["q_rope"],
                 "k_rope_t": rope["k_rope_t"], "mask": mask.reshape(batch, 1, t)}
        results["matmul-mla"] = time_layers(matmul_mla(t, c, r2), feeds, ("latent", "k_rope_t"), layers, threads, steps)

    if want("matmul-mla-ct") and layers == 1:
        s = session(matmul_mla_channels_first(t, c, r2), threads)
        b = bind(s, {"q": rnd(batch, H, c), "latent_ct": rnd(batch, c, t), "q_rope": rope["q_rope"],
                     "k_rope_t": rope["k_rope_t"], "mask": mask.reshape(batch, 1, t)}, {"out": None})
        results["matmul-mla-ct"] = time_binding(s, b, steps)

    for variant in EXPORT_FORMS:
        name = f"export-{variant}"
        if not want(name):
            continue
        q_rope, k_rope = rope["q_rope"], rnd(batch, HKV, t, r2)
        if variant == "joint":
            q = np.zeros((batch, H, c + HKV * r2), np.float32)
            q[..., :c] = rnd(batch, H, c)
            for h in range(H):
                j = h // (H // HKV)
                q[:, h, c + j * r2:c + (j + 1) * r2] = q_rope[:, j, h % (H // HKV)]
            feeds = {"q": q, "joint": np.concatenate([rnd(batch, t, c), k_rope.transpose(0, 2, 1, 3).reshape(batch, t, -1)], -1),
                     "mask": mask.reshape(batch, 1, t)}
            per = ("joint",)
        else:
            feeds = {"q": rnd(batch, H, c), "latent": rnd(batch, t, c), "q_rope": q_rope, "k_rope": k_rope,
                     "mask": mask.reshape(batch, 1, t)}
            per = ("latent", "k_rope")
        results[name] = time_layers(export_mla(t, c, r2, variant), feeds, per, layers, threads, steps)

    latent_f = rnd(batch, t, c) * rng.random((batch, t, 1), dtype=np.float32) * 4
    q_lat = rnd(batch, H, c) * 0.1
    for name, feeds in int8_feeds(q_lat, latent_f, rope["q_rope"], rope["k_rope_t"], mask.reshape(batch, 1, t)).items():
        if not want(name):
            continue
        results[name] = time_layers(INT8_FORMS[name](t, c, r2), feeds, ("latent", "scale", "k_rope_t"), layers, threads,
                                    steps)
    return results


INT8_FORMS = {"int8-cast-mla": int8_cast_mla,
              "u8int-q1w1": u8_integer_mla,
              "u8int-q2w1": lambda t, c, r2: u8_integer_mla(t, c, r2, q_digits=2),
              "u8int-q1w2": lambda t, c, r2: u8_integer_mla(t, c, r2, w_digits=2),
              "u8int-q2w2": lambda t, c, r2: u8_integer_mla(t, c, r2, q_digits=2, w_digits=2),
              "u8int-q2w2-mm": lambda t, c, r2: u8_integer_mla(t, c, r2, q_digits=2, w_digits=2, combine="matmul"),
              "u8int-q2-fout": lambda t, c, r2: u8_integer_mla(t, c, r2, q_digits=2, weights="float")}


STACKABLE |= set(INT8_FORMS)


def int8_feeds(q_BHC, latent_BTC, q_rope, k_rope_t, mask_B1T) -> dict[str, dict]:
    """Feeds of each int8 formulation for one float latent (quantized per token, as the cache is)."""
    amax = np.abs(latent_BTC).max(-1)
    scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    codes = np.clip(np.round(latent_BTC / scale[..., None]), -127, 127)
    rest = {"q": q_BHC, "scale": scale, "q_rope": q_rope, "k_rope_t": k_rope_t, "mask": mask_B1T}
    i8, u8 = codes.astype(np.int8), (codes + 128).astype(np.uint8)
    return {name: {**rest, "latent": i8 if name.startswith("int8") else u8} for name in INT8_FORMS}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--past", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--latent", type=int, nargs="+", default=[96, 24], help="c = d_kv·(kv heads) widths")
    p.add_argument("--rope-dims", type=int, default=8, help="2r per kv head")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cold", action="store_true", help="evict the CPU caches before every step (a 96 MB read, "
                   "untimed), as a whole model does: the cache is then read from memory, not from L2/L3")
    p.add_argument("--only", nargs="+", help="time only these formulations")
    p.add_argument("--layers", type=int, default=1, help="time N stacked layers, each with its own cache, and "
                   "report ms per layer (heads-as-rows and int8 forms only): the caches then come from memory")
    a = p.parse_args()
    if a.cold:
        COLD["scratch"] = np.zeros(24 * 2**20, np.float32)
    names = [n for n in ["gqa-original", "attention-original", "attention-mla", "gqa-mla", "matmul-mla",
                         "matmul-mla-ct", *(f"export-{v}" for v in EXPORT_FORMS), *INT8_FORMS]
             if (a.only is None or n in a.only) and (a.layers == 1 or n in STACKABLE)]
    print(f"one layer, one decode step, median ms ({a.threads} threads, batch {a.batch}{', cold caches' if a.cold else ''}"
          f"{f', per layer of {a.layers} stacked' if a.layers > 1 else ''})")
    print("| past | c | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for past in a.past:
        for c in a.latent:
            r = run(past, c, a.rope_dims, a.threads, a.steps, a.batch, a.only, a.layers)
            print(f"| {past} | {c} | " + " | ".join(f"{v:.3f}" for v in r.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
