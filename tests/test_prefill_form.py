"""Prompts decompressed, one-token steps absorbed: the exported program chooses per call.

``to_onnx(prefill="decompressed")`` (the default) gives every absorbed site both forms' folded
projections and one ONNX ``If`` on S == 1: prompts expand K/V from the written latent rows and run
one ONNX ``Attention``, decode steps read the latent directly. Both forms compute the same
function, so the folder must agree with PyTorch and with the one-form folder (``prefill="absorbed"``)
at every step (fp32, ≤ 1e-4), chunked or not, left-padded batches included.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import tiny_llama, tiny_qwen2
from onnx_drive import drive

import mla_pass
from mla_pass import MLAConfig
from mla_pass.lowering import LoweringSettings

onnx_export = pytest.importorskip("mla_pass.export.onnx", reason="the ONNX exporter needs onnx and onnxscript")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
from mla_pass.export.fusion.graph import Graph, subgraph_reads  # noqa: E402
from mla_pass.runtime import OnnxEngine  # noqa: E402
from mla_pass.runtime.manifest import Manifest  # noqa: E402

to_onnx, ExportError = onnx_export.to_onnx, onnx_export.ExportError


def _convert(model, **config):
    calibration = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    return mla_pass.convert(model, MLAConfig(**config), calibration=calibration, progress=False)


# d_kv=6: latent C = 12 below the head width 16, so decode steps fold W_uk / W_uv into their own
# projections; d_kv=12 (C = 24): they share the decompressed form's and apply W_uk / W_uv per head
DECODE_PROJECTIONS = {6: "folded", 12: "shared"}


@pytest.fixture(scope="module", params=sorted(DECODE_PROJECTIONS), ids=DECODE_PROJECTIONS.get)
def folders(request, tmp_path_factory):
    """A converted tiny Llama (GQA, mixed rope slots) exported with both prefill forms."""
    mla = _convert(tiny_llama(n_kv=2), d_kv=request.param, rope_freqs=3)
    out = tmp_path_factory.mktemp("prefill")
    return mla, {form: to_onnx(mla, out / form, max_length=96, prefill=form, progress=False)
                 for form in ("decompressed", "absorbed")}


def _ifs(folder) -> int:
    return sum(n.op_type == "If" for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def test_each_site_chooses_its_form_with_one_if(folders):
    mla, f = folders
    assert _ifs(f["decompressed"]) == len(mla.plans) and _ifs(f["absorbed"]) == 0
    notes = Manifest.read(f["decompressed"]).notes
    n = len(mla.plans)
    assert notes["prefill"].startswith(f"prompts (S > 1) decompressed at {n} of {n} sites")
    folded = n if DECODE_PROJECTIONS[mla.config.d_kv] == "folded" else 0
    assert f"folded into the decode projections at {folded} of them" in notes["prefill"]
    assert Manifest.read(f["absorbed"]).notes["prefill"] == "every step absorbed"
    # the export check ran both branches against PyTorch
    assert notes["verify_max_abs_logit_error"] <= 1e-4 and notes["verify_one_token_max_abs_logit_error"] <= 1e-4


def test_the_two_form_program_agrees_with_pytorch_over_32_decode_steps(folders):
    mla, f = folders
    ids = torch.randint(0, mla.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    errors, ort_tokens, torch_tokens = drive(f["decompressed"], mla.step, mla.empty_cache, ids)
    assert max(errors) <= 1e-4, f"max |Δlogits| per step: {errors}"
    np.testing.assert_array_equal(ort_tokens, torch_tokens)


@pytest.mark.parametrize("chunk", [None, 4, 5])
def test_prompt_logits_match_the_one_form_program_chunked_and_padded(folders, chunk):
    """A left-padded batch of two prompts of different lengths, prefilled in chunks (or in one
    step): the last logits of the two programs agree, and so do the tokens generated after."""
    _, f = folders
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 128, 13).tolist(), rng.integers(0, 128, 6).tolist()]
    engines = {form: OnnxEngine(folder, threads=1, prefill_chunk=chunk) for form, folder in f.items()}
    results = {}
    for form, engine in engines.items():
        engine.manifest.eos_token_ids = []
        width = max(map(len, prompts))
        ids = np.array([[0] * (width - len(p)) + p for p in prompts])
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        cache = engine.new_cache(2, width + 4)
        results[form] = (engine.prefill(ids, mask, cache, chunk), engine.generate(prompts, max_new_tokens=12).token_ids)
    (last_d, tokens_d), (last_a, tokens_a) = results["decompressed"], results["absorbed"]
    assert np.abs(last_d - last_a).max() <= 1e-4 * max(1.0, float(np.abs(last_a).max()))
    assert tokens_d == tokens_a


@pytest.mark.parametrize("latent_cache, d_kv", [("int8", 6), ("int4", 6), ("int4", 12)])
def test_a_quantized_latent_is_dequantized_for_prompts(latent_cache, d_kv, tmp_path):
    """The decompressed branch reads the same codes the absorbed one does (dequantized rows): the
    folder's greedy tokens equal the PyTorch program's of the same rounding."""
    mla = _convert(tiny_qwen2(), d_kv=d_kv, rope_freqs=2)
    folder = to_onnx(mla, tmp_path / latent_cache, max_length=64, latent_cache=latent_cache, progress=False)
    assert _ifs(folder) == len(mla.plans)
    engine = OnnxEngine(folder, threads=1, prefill_chunk=4)
    engine.manifest.eos_token_ids = []
    one_form = to_onnx(mla, tmp_path / f"{latent_cache}-absorbed", max_length=64, latent_cache=latent_cache,
                       prefill="absorbed", progress=False)
    reference = OnnxEngine(one_form, threads=1, prefill_chunk=4)
    reference.manifest.eos_token_ids = []
    prompt = [[5, 17, 33, 2, 9, 41, 77, 3, 12]]
    tokens = engine.generate(prompt, max_new_tokens=10).token_ids
    assert tokens == reference.generate(prompt, max_new_tokens=10).token_ids


def test_bad_prefill_requests_are_refused(folders, tmp_path):
    mla, _ = folders
    with pytest.raises(ValueError, match="prefill must be one of"):
        LoweringSettings(prefill="chunked")
    with pytest.raises(ValueError, match="prefill='absorbed'"):
        to_onnx(mla, tmp_path / "trt", target="tensorrt", prefill="decompressed", progress=False)
    assert not (tmp_path / "trt").exists()
    with pytest.raises(ValueError, match="chooses a converted model's prompt form"):
        to_onnx(tiny_llama(n_kv=2), tmp_path / "original", prefill="absorbed", progress=False)


def test_a_program_that_lost_its_forms_is_refused(folders, tmp_path, monkeypatch):
    """Every site that chooses its form must end as one If; an export where that failed (no If
    made) says so instead of shipping a program that decodes in the prompt form."""
    import mla_pass.export.branches as branches

    mla, _ = folders
    monkeypatch.setattr(branches, "branch_forms", lambda graph: 0)
    with pytest.raises(ExportError, match="0 If nodes for 2 sites"):
        to_onnx(mla, tmp_path / "lost", max_length=64, progress=False)
    assert not (tmp_path / "lost").exists()


def test_fusions_keep_what_an_if_branch_reads():
    """A Reshape round trip whose result only an If branch reads stays: the fusion index pins
    values read from inside subgraphs (it does not see their readers)."""
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 3])
    flat = helper.make_tensor("flat", TensorProto.INT64, [1], [6])
    then = helper.make_graph([helper.make_node("Identity", ["z"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["z"]),
             helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [shape, flat])
    assert subgraph_reads(nodes[2]) == {"z", "x"}
    g = Graph(graph)
    assert "z" in g.outputs                       # pinned: no fusion removes or renames it
    from mla_pass.export.fusion.layout import drop_round_trips
    assert drop_round_trips(g) == 0
