"""The TensorRT profile (``to_onnx(..., target="tensorrt")``): standard ONNX only, 4-D caches, checked.

Its graphs must pass the checker of TensorRT's ONNX restrictions and still be the same program:
onnxruntime (CPU) against PyTorch over a prefill and 32 decode steps, fp32 logits ≤ 1e-4, greedy
tokens equal. The checker must refuse a graph with each restriction broken, naming the node.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import tiny_llama
from onnx_drive import DECODE_STEPS, drive

import mla_pass
from mla_pass import MLAConfig

onnx = pytest.importorskip("onnx", reason="the ONNX exporter needs onnx and onnxscript")
onnx_export = pytest.importorskip("mla_pass.export.onnx", reason="the ONNX exporter needs onnx and onnxscript")
from onnx import TensorProto, helper  # noqa: E402

from mla_pass.export import tensorrt as trt  # noqa: E402
from mla_pass.export.common import ExportError  # noqa: E402
from mla_pass.runtime import OnnxEngine  # noqa: E402
from mla_pass.runtime.manifest import Manifest  # noqa: E402

to_onnx = onnx_export.to_onnx


def _graph(folder):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The calibrated default conversion (rope slots mixed across kv heads), both targets."""
    llama = tiny_llama(n_kv=2)
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(llama, MLAConfig(d_kv=6, rope_freqs=3), calibration=calibration, progress=False)
    root = tmp_path_factory.mktemp("trt")
    return mla, to_onnx(mla, root / "tensorrt", target="tensorrt", max_length=64, progress=False)


def test_converted_profile_is_standard_onnx_with_4d_caches(converted):
    mla, folder = converted
    model = _graph(folder)
    graph = model.graph
    assert trt.violations(model) == []
    assert {n.domain for n in graph.node} <= {""} and max(o.version for o in model.opset_import) <= 24
    assert "RMSNormalization" in {n.op_type for n in graph.node}
    manifest = Manifest.read(folder)
    assert manifest.notes["target"].startswith("tensorrt")
    latent = manifest.cache[0]
    assert latent.input == "past_key_values.0.latent"
    assert latent.shape == ["batch", 1, "past", mla.plans[0].latent_dim] and latent.time_axis == 2
    assert all(len(e.shape) == 4 and e.time_axis == 2 for e in manifest.cache)
    scatters = [n for n in graph.node if n.op_type == "TensorScatter"]
    assert len(scatters) == len(manifest.cache)
    assert all(helper.get_attribute_value(a) == -2 for n in scatters for a in n.attribute if a.name == "axis")
    assert manifest.kv_cache_bytes_per_token() == mla.kv_cache_bytes_per_token(dtype=torch.float32)


def test_converted_profile_agrees_with_pytorch_over_32_decode_steps(converted):
    mla, folder = converted
    ids = torch.randint(0, mla.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    errors, ort_tokens, torch_tokens = drive(folder, mla.step, mla.empty_cache, ids)
    assert len(errors) == DECODE_STEPS + 1 and max(errors) <= 1e-4, f"max |Δlogits| per step: {errors}"
    np.testing.assert_array_equal(ort_tokens, torch_tokens)


def test_runtime_generates_from_the_profile_as_mla_generate(converted):
    """The runtime reads the 4-D latent from the manifest like any cache (left-padded batch too)."""
    mla, folder = converted
    engine = OnnxEngine(folder, threads=1)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, mla.vocab_size, (n,), generator=gen).tolist() for n in (7, 3)]
    got = engine.generate(prompts, max_new_tokens=12).token_ids
    for p, tokens in zip(prompts, got):
        assert tokens == mla.generate(torch.tensor([p]), max_new_tokens=12)[0, len(p):].tolist()


def test_original_profile_reproduces_hf_greedy_tokens(tmp_path):
    """The baseline (a GQA Llama) without GroupQueryAttention: ONNX Attention with no past inputs,
    caches in place."""
    model = tiny_llama(n_kv=2)
    folder = to_onnx(model, tmp_path / "orig", target="tensorrt", progress=False)
    graph = _graph(folder)
    assert trt.violations(graph) == []
    attention = [n for n in graph.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2 and all(len([x for x in n.input if x]) <= 4 for n in attention)
    assert Manifest.read(folder).notes["attention"] == "ONNX Attention (masked SDPA)"
    from mla_pass.baseline import kv_step_program
    program = kv_step_program(model)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    errors, ort_tokens, _ = drive(folder, program.step, program.empty_cache, ids)
    assert max(errors) <= 1e-4
    want = model.generate(ids, max_new_tokens=DECODE_STEPS + 1, do_sample=False)[0, 7:].numpy()
    np.testing.assert_array_equal(ort_tokens[0], want)


def test_the_default_target_breaks_tensorrt_rules_by_name(tmp_path):
    """What the profile takes out is really there in the onnxruntime export, and the checker says so."""
    folder = to_onnx(tiny_llama(n_kv=2), tmp_path / "ort", progress=False)
    found = "\n".join(trt.violations(_graph(folder)))
    assert "com.microsoft::GroupQueryAttention" in found and "SkipSimplifiedLayerNormalization" in found
    with pytest.raises(ExportError, match="TensorRT's ONNX restrictions"):
        trt.check(_graph(folder))


@pytest.mark.parametrize("kwargs", [dict(quantize="int8"), dict(quantize="int4"), dict(latent_cache="int8"),
                                    dict(cache_update="concat")], ids=lambda k: "-".join(map(str, k.values())))
def test_profile_refuses_what_tensorrt_does_not_take(converted, kwargs, tmp_path):
    mla, _ = converted
    with pytest.raises(ValueError, match="target='tensorrt'"):
        to_onnx(mla, tmp_path / "x", target="tensorrt", **kwargs)
    assert not (tmp_path / "x").exists()


def test_unknown_target_is_refused(converted, tmp_path):
    with pytest.raises(ValueError, match="target must be one of"):
        to_onnx(converted[0], tmp_path / "x", target="tflite")


# -- the checker, one broken restriction at a time ------------------------------------------------

F, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32


def _model(nodes, inputs, outputs, initializers=(), opset=24, value_info=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(initializers),
                              value_info=[helper.make_tensor_value_info(*v) for v in value_info])
    imports = [helper.make_opsetid("", opset)] + \
        [helper.make_opsetid(d, 1) for d in {n.domain for n in nodes} if d]
    return helper.make_model(graph, opset_imports=imports)


def _axes(name="axes", values=(1,)):
    return helper.make_tensor(name, I64, [len(values)], list(values))


def _scatter(rank, axis):
    shape = [2, 1, 8, 4][-rank:] if rank == 3 else [2, 1, 8, 4]
    update = list(shape)
    update[-2] = 1
    node = helper.make_node("TensorScatter", ["c", "u", "w"], ["o"], name="scatter", axis=axis)
    return _model([node], [("c", F, shape), ("u", F, update), ("w", I64, [2])], [("o", F, shape)])


def _attention(past: bool, present: bool):
    q = [("q", F, [1, 2, 3, 4]), ("k", F, [1, 2, 3, 4]), ("v", F, [1, 2, 3, 4])]
    inputs = ["q", "k", "v", "", "pk" if past else "", "pv" if past else ""]
    outputs = ["y"] + (["pk_out", "pv_out"] if present else [])
    extra = [("pk", F, [1, 2, 5, 4]), ("pv", F, [1, 2, 5, 4])] if past else []
    node = helper.make_node("Attention", inputs, outputs, name="attention")
    return _model([node], q + extra, [("y", F, [1, 2, 3, 4])] + [(o, F, None) for o in outputs[1:]])


def _rotary(rank: int, position_type):
    shape = [1, 2, 3, 4] if rank == 4 else [1, 3, 8]
    inputs = [("x", F, shape), ("cos", F, [16, 2]), ("sin", F, [16, 2]), ("p", position_type, [1, 3])]
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "p"], ["y"], name="rotary",
                            **({} if rank == 4 else {"num_heads": 2}))
    return _model([node], inputs, [("y", F, shape)], opset=23)


BROKEN = {
    "another domain": (_model([helper.make_node("GroupQueryAttention", ["x"], ["y"], name="gqa",
                                                domain="com.microsoft")],
                              [("x", F, [1])], [("y", F, [1])]), "gqa.*domain com.microsoft"),
    "opset 25": (_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", F, [1])], [("y", F, [1])],
                        opset=25), "opset 25"),
    "unsupported op": (_model([helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mmi")],
                              [("a", TensorProto.UINT8, [2, 2]), ("b", TensorProto.INT8, [2, 2])],
                              [("y", I32, [2, 2])]), "mmi.*not an operator"),
    "3-D TensorScatter": (_scatter(3, -2), "scatter.*rank 3"),
    "TensorScatter axis 2": (_scatter(4, 2), "scatter.*axis = 2"),
    "Attention with past": (_attention(past=True, present=False), "attention.*past_key, past_value"),
    "Attention with present": (_attention(past=False, present=True), "attention.*present_key"),
    "RotaryEmbedding int32 positions": (_rotary(4, I32), "rotary.*position_ids are INT32"),
    "RotaryEmbedding 3-D input": (_rotary(3, I64), "rotary.*rank 3"),
    "computed Slice axes": (_model([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"], name="slice")],
                                   [("x", F, [4, 4]), ("s", I64, [1]), ("e", I64, [1]), ("a", I64, [1])],
                                   [("y", F, None)]), "slice.*axes is computed"),
    "computed Unsqueeze axes": (_model([helper.make_node("Unsqueeze", ["x", "a"], ["y"], name="unsq")],
                                       [("x", F, [4]), ("a", I64, [1])], [("y", F, None)]), "unsq.*axes is computed"),
    "UINT8 inside": (_model([helper.make_node("Cast", ["x"], ["c"], name="to_u8", to=TensorProto.UINT8),
                             helper.make_node("Cast", ["c"], ["y"], name="back", to=F)],
                            [("x", F, [4])], [("y", F, [4])], value_info=[("c", TensorProto.UINT8, [4])]),
                     "value c: UINT8"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_checker_refuses_each_broken_restriction(case):
    model, says = BROKEN[case]
    found = trt.violations(model)
    assert len(found) == 1, found
    assert re.search(says, found[0]), found[0]
    with pytest.raises(ExportError, match="breaks 1 of TensorRT's ONNX restrictions"):
        trt.check(model)


def test_checker_passes_each_restriction_kept():
    kept = [_scatter(4, -2), _attention(past=False, present=False), _rotary(4, I64),
            _model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsq")], [("x", F, [4])],
                   [("y", F, None)], [_axes()])]
    for model in kept:
        assert trt.violations(model) == []
