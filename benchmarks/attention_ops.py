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


def session(model_bytes, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def time_binding(sess, binding, steps):
    sess.run_with_iobinding(binding)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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


def run(past, c, r2, threads, steps, batch=1):
    rng = np.random.default_rng(0)
    t = past + 1
    max_t = past + 64
    rnd = lambda *s: rng.standard_normal(s, dtype=np.float32)
    mask = np.zeros((batch, 1, 1, t), np.float32)
    results = {}

    kc = ort.OrtValue.ortvalue_from_numpy(rnd(batch, HKV, max_t, D))
    vc = ort.OrtValue.ortvalue_from_numpy(rnd(batch, HKV, max_t, D))
    s = session(gqa_original(max_t), threads)
    b = bind(s, {"q": rnd(batch, 1, H * D), "k": rnd(batch, 1, HKV * D), "v": rnd(batch, 1, HKV * D),
                 "past_k": kc, "past_v": vc, "seqlens_k": np.full(batch, past, np.int32),
                 "total": np.array(t, np.int32)}, {"out": None, "present_k": kc, "present_v": vc})
    results["gqa-original"] = time_binding(s, b, steps)

    s = session(attention_original(t), threads)
    b = bind(s, {"q": rnd(batch, H, 1, D), "k": rnd(batch, HKV, t, D), "v": rnd(batch, HKV, t, D), "mask": mask}, {"out": None})
    results["attention-original"] = time_binding(s, b, steps)

    rope = {"q_rope": rnd(batch, HKV, H // HKV, r2), "k_rope_t": rnd(batch, HKV, r2, t), "mask": mask}
    s = session(attention_mla(t, c, r2), threads)
    b = bind(s, {"q": rnd(batch, H, 1, c), "latent": rnd(batch, 1, t, c), **rope}, {"out": None})
    results["attention-mla"] = time_binding(s, b, steps)

    lat = ort.OrtValue.ortvalue_from_numpy(rnd(batch, 1, max_t, c))
    s = session(gqa_mla(t, c, r2, max_t), threads)
    b = bind(s, {"q": rnd(batch, 1, H * c), "k": rnd(batch, 1, c), "past": lat, "seqlens_k": np.full(batch, past, np.int32),
                 "total": np.array(t, np.int32), **rope}, {"out": None, "present_k": lat, "present_v": lat})
    results["gqa-mla"] = time_binding(s, b, steps)

    s = session(matmul_mla(t, c, r2), threads)
    b = bind(s, {"q": rnd(batch, H, c), "latent": rnd(batch, t, c), "q_rope": rope["q_rope"],
                 "k_rope_t": rope["k_rope_t"], "mask": mask.reshape(batch, 1, t)}, {"out": None})
    results["matmul-mla"] = time_binding(s, b, steps)

    s = session(matmul_mla_channels_first(t, c, r2), threads)
    b = bind(s, {"q": rnd(batch, H, c), "latent_ct": rnd(batch, c, t), "q_rope": rope["q_rope"],
                 "k_rope_t": rope["k_rope_t"], "mask": mask.reshape(batch, 1, t)}, {"out": None})
    results["matmul-mla-ct"] = time_binding(s, b, steps)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--past", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--latent", type=int, nargs="+", default=[96, 24], help="c = d_kv·(kv heads) widths")
    p.add_argument("--rope-dims", type=int, default=8, help="2r per kv head")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    names = ["gqa-original", "attention-original", "attention-mla", "gqa-mla", "matmul-mla", "matmul-mla-ct"]
    print(f"one layer, one decode step, median ms ({a.threads} threads, batch {a.batch})")
    print("| past | c | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for past in a.past:
        for c in a.latent:
            r = run(past, c, a.rope_dims, a.threads, a.steps, a.batch)
            print(f"| {past} | {c} | " + " | ".join(f"{v:.3f}" for v in r.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
