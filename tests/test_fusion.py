"""The exporter's fusion pass (export/fusion.py): onnxruntime's fused kernels found from the graph.

On whole exports: a tiny Llama's RMSNorms, residual adds, RoPE, layout round trips and sibling
projections fuse and the export still agrees with the PyTorch step program (≤ 1e-4 over a
left-padded prefill and decode steps); a GPT-2 model's LayerNorm is left alone and stays exact.
On small hand-built graphs: each variant of a pattern fuses to the same numbers, and near misses
(another axis, a scaled cos, a broadcasting residual, a value read elsewhere) keep their nodes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_llama
from onnx_drive import session as _session

onnx = pytest.importorskip("onnx", reason="the ONNX exporter needs onnx")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
onnx_export = pytest.importorskip("mla_pass.export.onnx", reason="the ONNX exporter needs onnx and onnxscript")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mla_pass.export.fusion import fuse, op_counts  # noqa: E402
from mla_pass.runtime.manifest import Manifest  # noqa: E402

STEPS = 6


def _drive(folder, step, empty_cache, ids, steps=STEPS):
    """Left-padded prefill then greedy decode steps in onnxruntime and PyTorch side by side;
    the largest |Δlogits| over all steps."""
    manifest = Manifest.read(folder)
    session = _session(folder / manifest.model_file)
    b, s = ids.shape
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :2] = 0
    ort_cache = [np.zeros(e.concrete_shape(b, s + steps + 1), np.float32) for e in manifest.cache]
    torch_cache, cur, worst = empty_cache(b), ids, 0.0
    for _ in range(steps + 1):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -cur.shape[1]:]
        feeds = {"input_ids": cur.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        feeds.update({e.input: c for e, c in zip(manifest.cache, ort_cache)})
        logits, *ort_cache = session.run(None, feeds)
        with torch.no_grad():
            want, *torch_cache = step(cur, pos, mask, *torch_cache)
        worst = max(worst, float(np.abs(logits[:, -1] - want[:, -1].numpy()).max()))
        cur = want[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
    return worst


def _ops(folder):
    return op_counts(onnx.load(str(folder / "model.onnx"), load_external_data=False))


def test_llama_export_fuses_and_agrees_with_pytorch(tmp_path):
    from mla_pass.baseline import kv_step_program

    model = tiny_llama(n_kv=2)
    program = kv_step_program(model)
    fused = onnx_export.to_onnx(model, tmp_path / "fused")
    plain = onnx_export.to_onnx(model, tmp_path / "plain", fuse=False)
    # 2 layers: 2 norms each + the final one; every norm but the first follows a residual add;
    # q and k rotated per layer; v and the attention output lose their Reshape round trips;
    # q/k/v and gate/up are packed per layer
    assert Manifest.read(fused).notes["fused"] == {"rms_norm": 5, "skip_rms_norm": 4, "rotary": 4, "layout": 4,
                                                   "packed_matmul": 4}
    assert "fused" not in Manifest.read(plain).notes
    ops, before = _ops(fused), _ops(plain)
    assert before["Pow"] == 5 and before["Neg"] == 4 and before["MatMul"] == 15
    assert ops["SimplifiedLayerNormalization"] == 1 and ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 4
    assert ops["RotaryEmbedding"] == 4 and ops["MatMul"] == 9
    assert not {"Pow", "Sqrt", "Reciprocal", "Neg", "Reshape", "Transpose"} & set(ops)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    for folder in (fused, plain):
        err = _drive(folder, program.step, program.empty_cache, ids)
        assert err <= 1e-4, f"{folder.name}: max |Δlogits| {err:.2e} > 1e-4"


def test_gpt2_layer_norm_is_left_alone_and_exact(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from mla_pass.baseline import kv_step_program

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                        n_inner=128)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = onnx_export.to_onnx(model, tmp_path / "gpt2")
    counts = Manifest.read(folder).notes["fused"]
    assert counts["rms_norm"] == counts["skip_rms_norm"] == counts["rotary"] == 0, counts
    ops = _ops(folder)
    assert ops["LayerNormalization"] == 5 and "SimplifiedLayerNormalization" not in ops
    program = kv_step_program(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    err = _drive(folder, program.step, program.empty_cache, ids)
    assert err <= 1e-4, f"max |Δlogits| {err:.2e} > 1e-4"


# -- hand-built graphs ---------------------------------------------------------------------------

D, H, HD = 16, 3, 8          # hidden, heads, head size (H·HD = 24)


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    return onnx.shape_inference.infer_shapes(model)


def _value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _rms_norm(variant="rsqrt", axis=-1, weight_shape=(D,), extra_output=False):
    """RMSNorm over x [B, S, D] as torch.onnx writes it (and variants)."""
    gen = np.random.default_rng(0)
    inits = {"two": np.float32(2.0), "axes": np.array([axis], np.int64), "eps": np.float32(1e-5),
             "w": gen.standard_normal(weight_shape).astype(np.float32)}
    square = helper.make_node("Mul", ["x", "x"], ["sq"]) if variant == "square" else \
        helper.make_node("Pow", ["x", "two"], ["sq"])
    nodes = [square, helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"])]
    if variant == "div":
        nodes.append(helper.make_node("Div", ["x", "rms"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["rms"], ["r"]), helper.make_node("Mul", ["r", "x"], ["n"])]
    nodes.append(helper.make_node("Mul", ["w", "n"], ["y"]))
    outputs = [_value("y", ["b", "s", D])] + ([_value("rms", None)] if extra_output else [])
    return _model(nodes, [_value("x", ["b", "s", D])], outputs, inits)


def _same_outputs(before, after, feeds):
    want, got = _session(before).run(None, feeds), _session(after).run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


X = {"x": np.random.default_rng(1).standard_normal((2, 3, D)).astype(np.float32)}


@pytest.mark.parametrize("variant", ["rsqrt", "div", "square"])
def test_rms_norm_variants_fuse_to_the_same_numbers(variant):
    model = _rms_norm(variant)
    source = model.SerializeToString()
    fused, counts = fuse(model)
    assert model.SerializeToString() == source                      # a new model; the input is untouched
    assert counts["rms_norm"] == 1 and dict(op_counts(fused)) == {"SimplifiedLayerNormalization": 1}
    _same_outputs(model, fused, X)


@pytest.mark.parametrize("kwargs", [dict(axis=1), dict(weight_shape=(1, D)), dict(extra_output=True)],
                         ids=["other-axis", "broadcast-weight", "rms-read-elsewhere"])
def test_rms_norm_near_misses_keep_their_nodes(kwargs):
    model = _rms_norm(**kwargs)
    fused, counts = fuse(model)
    assert counts["rms_norm"] == 0 and op_counts(fused) == op_counts(model)
    _same_outputs(model, fused, X)


def test_residual_add_fuses_only_without_broadcast():
    model = _rms_norm()
    for skip_shape, want in ((["b", "s", D], 1), ([D], 0)):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        g = m.graph
        del g.input[:]
        del g.value_info[:]
        g.input.extend([_value("a", ["b", "s", D]), _value("skip", skip_shape)])
        # the residual stream goes on, read before the norm in node order (the fused node, in
        # the norm's slot, must still come first)
        g.node.insert(0, helper.make_node("Add", ["a", "skip"], ["x"]))
        g.node.insert(1, helper.make_node("Identity", ["x"], ["residual"]))
        g.output.append(_value("residual", ["b", "s", D]))
        m = onnx.shape_inference.infer_shapes(m)
        fused, counts = fuse(m)
        assert counts["rms_norm"] == 1 and counts["skip_rms_norm"] == want
        seen = {"a", "skip", "w", ""}
        for node in fused.graph.node:
            assert set(node.input) <= seen, f"{node.op_type} reads a value produced later"
            seen |= set(node.output)
        feeds = {"a": X["x"], "skip": np.random.default_rng(2).standard_normal(
            [2, 3, D] if want else [D]).astype(np.float32)}
        _same_outputs(m, fused, feeds)


def _rope(cos_scale=None):
    """Llama's q path: y [B,S,H·HD] → Reshape → Transpose → x·cos + rotate_half(x)·sin →
    Transpose → Reshape, with cos/sin = Cos/Sin(Concat(f, f)) Unsqueezed at axis 1."""
    half = HD // 2
    inits = {"shape4": np.array([0, 0, H, HD], np.int64), "shape3": np.array([0, 0, H * HD], np.int64),
             "one": np.array([1], np.int64), "axis": np.array([3], np.int64), "zero": np.array([0], np.int64),
             "half": np.array([half], np.int64), "end": np.array([2 ** 62], np.int64), "scale": np.float32(0.5)}
    cos = "cos_scaled" if cos_scale else "cos"
    nodes = [helper.make_node("Reshape", ["y", "shape4"], ["y4"]),
             helper.make_node("Transpose", ["y4"], ["x"], perm=[0, 2, 1, 3]),
             helper.make_node("Concat", ["f", "f"], ["emb"], axis=-1),
             helper.make_node("Cos", ["emb"], ["cos"]), helper.make_node("Sin", ["emb"], ["sin"]),
             *([helper.make_node("Mul", ["cos", "scale"], ["cos_scaled"])] if cos_scale else []),
             helper.make_node("Unsqueeze", [cos, "one"], ["c4"]), helper.make_node("Unsqueeze", ["sin", "one"], ["s4"]),
             helper.make_node("Slice", ["x", "zero", "half", "axis", "one"], ["x1"]),
             helper.make_node("Slice", ["x", "half", "end", "axis", "one"], ["x2"]),
             helper.make_node("Neg", ["x2"], ["nx2"]), helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
             helper.make_node("Mul", ["x", "c4"], ["xc"]), helper.make_node("Mul", ["rot", "s4"], ["rs"]),
             helper.make_node("Add", ["xc", "rs"], ["xr"]),
             helper.make_node("Transpose", ["xr"], ["xt"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["xt", "shape3"], ["out"])]
    return _model(nodes, [_value("y", ["b", "s", H * HD]), _value("f", ["b", "s", half])],
                  [_value("out", ["b", "s", H * HD])], inits)


ROPE_FEEDS = {"y": np.random.default_rng(3).standard_normal((2, 5, H * HD)).astype(np.float32),
              "f": np.random.default_rng(4).uniform(0, 50, (2, 5, HD // 2)).astype(np.float32)}


def test_rope_fuses_on_the_projection_itself():
    model = _rope()
    fused, counts = fuse(model)
    assert counts["rotary"] == 1
    assert dict(op_counts(fused)) == {"Cos": 1, "Sin": 1, "RotaryEmbedding": 1}    # no layout nodes left
    _same_outputs(model, fused, ROPE_FEEDS)


def test_scaled_rope_tables_are_left_alone():
    model = _rope(cos_scale=True)
    fused, counts = fuse(model)
    assert counts["rotary"] == 0 and op_counts(fused)["Neg"] == 1
    _same_outputs(model, fused, ROPE_FEEDS)


def test_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match="unknown fusions"):
        fuse(_rms_norm(), only=("rms_norm", "flash"))
