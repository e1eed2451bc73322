"""ONNX export (mla_pass.export.to_onnx): onnxruntime runs the same program PyTorch runs.

Each check drives the exported step with plain onnxruntime (the runtime package has its own
tests) next to the PyTorch step program: a prefill then 32 decode steps, each feeding back its
own cache. fp32 logits must agree within 1e-4 at every step and the greedy tokens must match.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_llama, tiny_qwen2
from onnx_drive import DECODE_STEPS, session as _session
from onnx_drive import drive as _drive

import mla_pass
from mla_pass import MLAConfig

onnx_export = pytest.importorskip("mla_pass.export.onnx", reason="the ONNX exporter needs onnx and onnxscript")
import mla_pass.export.verify as export_verify  # noqa: E402  (to_onnx's check, spied on below)
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
to_onnx, ExportError = onnx_export.to_onnx, onnx_export.ExportError
from mla_pass.runtime.manifest import Manifest, ManifestError  # noqa: E402

@pytest.fixture(scope="module")
def llama():
    return tiny_llama(n_kv=2)


@pytest.fixture(scope="module")
def mla_folder(llama, tmp_path_factory):
    """The default conversion with calibration: rope slots mixed across the kv heads."""
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(llama, MLAConfig(d_kv=6, rope_freqs=3), calibration=calibration, progress=False)
    assert all(p.rope_mixed for p in mla.plans.values())
    return mla, to_onnx(mla, tmp_path_factory.mktemp("mla") / "out", max_length=128)


def test_mla_export_agrees_with_pytorch_over_32_decode_steps(mla_folder):
    mla, folder = mla_folder
    assert Manifest.read(folder).cache_update == "in_place"
    ids = torch.randint(0, mla.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    errors, ort_tokens, torch_tokens = _drive(folder, mla.step, mla.empty_cache, ids)
    assert max(errors) <= 1e-4, f"max |Δlogits| per step: {errors}"
    np.testing.assert_array_equal(ort_tokens, torch_tokens)


def test_manifest_describes_the_compressed_cache(mla_folder):
    mla, folder = mla_folder
    manifest = Manifest.read(folder)
    assert manifest.kind == "mla" and manifest.max_length == 128
    assert [e.input for e in manifest.cache] == [t.name for t in mla.cache_spec]
    first = manifest.cache[0]
    assert first.input == "past_key_values.0.latent" and first.output == "present.0.latent"
    assert first.shape == ["batch", "past", mla.plans[0].latent_dim]
    rope = manifest.cache[1]
    assert rope.shape == ["batch", 1, "past", 12] and rope.time_axis == 2
    assert manifest.kv_cache_bytes_per_token() == mla.kv_cache_bytes_per_token(dtype=torch.float32)
    assert manifest.mla_config["d_kv"] == 6
    session = _session(folder)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids"] + \
        [e.input for e in manifest.cache]
    # weights are stored once, as external data
    assert (folder / "model.onnx.data").stat().st_size > 4 * sum(p.numel() for p in mla.step.parameters()) * 0.5


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama-gqa", "qwen2"])
def test_original_export_reproduces_hf_greedy_tokens(make, tmp_path):
    model = make()
    folder = to_onnx(model, tmp_path / "orig")
    manifest = Manifest.read(folder)
    assert manifest.kind == "original" and manifest.mla_config is None
    assert manifest.notes["attention"] == "com.microsoft GroupQueryAttention at 2 of 2 sites"   # in place
    assert [e.input for e in manifest.cache[:2]] == ["past_key_values.0.key", "past_key_values.0.value"]
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    from mla_pass.baseline import kv_step_program
    program = kv_step_program(model)
    errors, ort_tokens, _ = _drive(folder, program.step, program.empty_cache, ids)
    assert max(errors) <= 1e-4
    want = model.generate(ids, max_new_tokens=DECODE_STEPS + 1, do_sample=False)[0, 7:].numpy()
    np.testing.assert_array_equal(ort_tokens[0], want)


def test_full_rank_mla_export_reproduces_the_original_tokens(llama, tmp_path):
    """Also the concatenating cache program (cache_update="concat")."""
    mla = mla_pass.convert(llama, MLAConfig(), progress=False)
    folder = to_onnx(mla, tmp_path / "exact", cache_update="concat")
    assert Manifest.read(folder).cache_update == "concat"
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    errors, ort_tokens, _ = _drive(folder, mla.step, mla.empty_cache, ids)
    want = llama.generate(ids, max_new_tokens=DECODE_STEPS + 1, do_sample=False)[0, 6:].numpy()
    np.testing.assert_array_equal(ort_tokens[0], want)


def test_float16_export_runs_close_to_fp32(mla_folder, tmp_path):
    mla, _ = mla_folder
    folder = to_onnx(mla, tmp_path / "fp16", dtype="float16")
    manifest = Manifest.read(folder)
    assert manifest.dtype == "float16" and all(e.dtype == "float16" for e in manifest.cache)
    assert manifest.kv_cache_bytes_per_token() == mla.kv_cache_bytes_per_token(dtype=torch.float16)
    assert next(mla.program.parameters()).dtype == torch.float32      # the source model is not cast


def test_export_refuses_bad_requests(mla_folder, llama, tmp_path):
    mla, folder = mla_folder
    with pytest.raises(FileExistsError, match="not empty"):
        to_onnx(mla, folder)
    with pytest.raises(ValueError, match="dtype"):
        to_onnx(mla, tmp_path / "x", dtype="int4")
    with pytest.raises(ValueError, match="cache_update"):
        to_onnx(mla, tmp_path / "x", cache_update="ring")
    with pytest.raises(TypeError, match="MLAModel or a torch decoder"):
        to_onnx("not a model", tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        to_onnx(llama, tmp_path / "z", tokenizer=tmp_path / "missing")
    assert not (tmp_path / "z").exists()          # a failed export leaves no folder behind


def test_corrupted_folders_are_refused(mla_folder, tmp_path):
    import shutil
    _, folder = mla_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="SHA-256"):
        Manifest.read(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        Manifest.read(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.read(copy)
    (copy / "manifest.json").write_text(json.dumps({"format": "mla-pass-onnx", "version": 99}))
    with pytest.raises(ManifestError, match="version"):
        Manifest.read(copy)


def test_int8_weights_shrink_the_folder_and_still_run(mla_folder, tmp_path):
    mla, fp32 = mla_folder
    folder = to_onnx(mla, tmp_path / "int8", quantize="int8")
    manifest = Manifest.read(folder)
    assert manifest.notes["weights"].startswith("int8")
    # the graph was held to the float tolerance before its weights were quantized
    assert manifest.notes["verify_before_int8_weights_max_abs_logit_error"] < 1e-3, manifest.notes
    assert manifest.notes["verify_worst_relative_rms_error"] < 0.5, manifest.notes
    size = lambda f: sum(p.stat().st_size for p in f.iterdir() if p.name.startswith("model."))  # noqa: E731
    assert size(folder) < 0.7 * size(fp32)        # embeddings and norms stay fp32
    ids = torch.randint(0, mla.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    errors, _, _ = _drive(folder, mla.step, mla.empty_cache, ids, steps=4)
    assert max(errors) < 0.25 * 4, errors      # close to fp32, not equal: int8 weights change the logits
    with pytest.raises(ValueError, match="int8"):
        to_onnx(mla, tmp_path / "bad", quantize="int8", dtype="float16")
    with pytest.raises(ValueError, match="'int8' or 'int4', got 'int2'"):
        to_onnx(mla, tmp_path / "bad", quantize="int2")


@pytest.mark.parametrize("precision,bits", [("int8", 8), ("int4", 4)])
def test_quantized_weights_take_a_tied_lm_head_as_onnxruntime_genai_does(tmp_path, precision, bits):
    """Every weight MatMul becomes MatMulNBits with genai's CPU settings for that precision
    (symmetric, blocks of 32, accuracy level 4). A tied lm_head is traced as h · Transpose(embedding):
    it gets its own quantized copy (as in genai's builds), the token Gather keeps reading the fp32
    embedding."""
    import onnx
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mla_pass.baseline import kv_step_program

    # vocab 512 × 64 is above the exporter's constant folding limit (8192 values), as real models
    # are: the lm_head stays Transpose(embedding) in the graph (smaller ones get a folded copy)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    tied = AutoModelForCausalLM.from_config(cfg).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    folder = to_onnx(tied, tmp_path / precision, quantize=precision)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    head = producer["logits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    assert head.op_type == "MatMulNBits", head.op_type
    quantized = (attrs["bits"], attrs["block_size"], attrs["accuracy_level"], attrs["N"])
    assert quantized == (bits, 32, 4, tied.config.vocab_size), quantized
    assert {onnx.helper.get_attribute_value(a) for n in graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"} == {bits}
    assert len(head.input) == 3, "symmetric: no zero points"
    # every MatMul left in float reads no weight (constant or transposed constant)
    weights = [n for n in graph.node if n.op_type == "MatMul" and any(
        i in inits or (i in producer and producer[i].op_type == "Transpose") for i in n.input)]
    assert not weights, [n.name for n in weights]
    embedding = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and list(inits[n.input[0]].dims) == [tied.config.vocab_size, tied.config.hidden_size]]
    assert len(embedding) == 1 and inits[embedding[0].input[0]].data_type == onnx.TensorProto.FLOAT
    manifest = Manifest.read(folder)
    assert manifest.notes["quantized"]["untied"] == 1, "the lm_head was not traced as Transpose(embedding)"
    assert manifest.notes["weights"].startswith(f"{precision} (MatMulNBits"), manifest.notes["weights"]
    program = kv_step_program(tied)
    ids = torch.randint(0, tied.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    errors, _, _ = _drive(folder, program.step, program.empty_cache, ids, steps=4)
    assert max(errors) < 0.25 * 4, errors


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_weights_are_what_matmulnbits_computes_with(tmp_path, bits):
    """The export check's reference for quantized weights: each MatMulNBits (in the graph and in
    an If branch, K not a multiple of the block) as a MatMul over the weights its codes stand for.
    With accuracy level 0 (float compute) onnxruntime's MatMulNBits gives the same numbers."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mla_pass.export.quantize import dequantized_weights, quantize_weights

    rng = np.random.default_rng(0)
    k, n = 72, 40                                 # 72 = 2¼ blocks of 32
    w = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"w{i}")
         for i, shape in enumerate([(k, k), (k, n)])]
    branch = helper.make_graph([helper.make_node("MatMul", ["h", "w1"], ["z"])], "then", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w[1]])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]),
             helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w[0]])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "m.onnx",
              save_as_external_data=True)
    report = quantize_weights(tmp_path / "m.onnx", f"int{bits}")
    assert report[f"int{bits}_matmuls"] == 2
    assert 0 < report["worst_weight_rounding"] < (0.02 if bits == 8 else 0.15), report
    quantized = onnx.load(str(tmp_path / "m.onnx"))
    reference = dequantized_weights(quantized)
    assert not [nd for nd in reference.graph.node if nd.op_type == "MatMulNBits"]
    for nd in quantized.graph.node:               # float compute: the weights' codes are the only rounding
        for a in nd.attribute:
            if a.name == "accuracy_level":
                a.i = 0
            if a.name == "then_branch":
                for inner in a.g.node:
                    for b in inner.attribute:
                        if b.name == "accuracy_level":
                            b.i = 0
    x = {"x": rng.standard_normal((3, k)).astype(np.float32), "c": np.array(True)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]  # noqa: E731
    got, want = run(quantized), run(reference)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_codes_written_for_another_weight_are_refused(tmp_path, monkeypatch):
    """quantize_weights checks that every MatMulNBits stands for the weight it replaced (the
    export check's reference is built from the codes, so it could not see this)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import mla_pass.export.quantize as quantize

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "m.onnx")
    real = quantize.import_quantizer()

    class Shuffled(real):                       # quantizes, then reverses the order of W's code rows
        def process(self):
            super().process()
            codes = next(t for t in self.model.model.graph.initializer if t.data_type == TensorProto.UINT8)
            a = numpy_helper.to_array(codes).copy()
            codes.CopyFrom(numpy_helper.from_array(a[::-1].copy(), codes.name))

    monkeypatch.setattr(quantize, "import_quantizer", lambda: Shuffled)
    with pytest.raises(ValueError, match="the quantizer wrote codes for another weight"):
        quantize.quantize_weights(tmp_path / "m.onnx", "int4")


def test_int8_weights_leave_the_logging_configuration_alone():
    """onnxruntime's quantizer module calls logging.basicConfig(level=INFO) on import, which
    made later exports print hundreds of onnxscript INFO lines."""
    code = ("import logging; from mla_pass.export.quantize import import_quantizer; import_quantizer(); "
            "root = logging.getLogger(); print(len(root.handlers), root.level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", str(logging.WARNING)], out


def _spy_on_verify(monkeypatch) -> dict:
    """Let to_onnx's check run as usual and keep what it was given: ``args`` and ``wrapper`` of
    its last call, and the unpatched ``real_verify``."""
    seen = {"real_verify": export_verify.check_export}

    def spy(folder, manifest, wrapper, args, *rest, **kw):
        seen.update(args=args, wrapper=wrapper)
        return seen["real_verify"](folder, manifest, wrapper, args, *rest, **kw)

    monkeypatch.setattr(export_verify, "check_export", spy)
    return seen


@pytest.mark.parametrize("cache_update", ["in_place", "concat"])
def test_quantized_exports_are_checked_over_text_and_a_cache_the_model_wrote(llama, tmp_path, monkeypatch,
                                                                             cache_update):
    """A quantized export is verified on the example step over the model's own greedy text and a
    past its own program prefilled (random tokens throw a deep model's int8 logits around): that
    past is a real cache, so the step's logits equal those of one prefill of the whole text."""
    mla = mla_pass.convert(llama, MLAConfig(d_kv=6, rope_freqs=3), progress=False)
    seen = _spy_on_verify(monkeypatch)
    real_text = export_verify.model_text

    def spy_text(*a, **kw):
        seen["text"] = real_text(*a, **kw)
        return seen["text"]

    monkeypatch.setattr(export_verify, "model_text", spy_text)
    to_onnx(mla, tmp_path / "q", quantize="int8", cache_update=cache_update)
    ids, mask, pos, *past = seen["args"]
    text, (b, s) = seen["text"], ids.shape
    t = mask.shape[1] - s
    assert torch.equal(ids, text[:, t:])
    if cache_update == "in_place":          # nothing written beyond the prefill's T tokens
        assert all(not p.narrow(axis, t, p.shape[axis] - t).any()
                   for p, axis in zip(past, [e.time_axis for e in Manifest.read(tmp_path / "q").cache]))
    with torch.no_grad():
        step_logits = seen["wrapper"](ids, mask, pos, *past)[0]
        whole = mla(text, attention_mask=mask)
    whole = whole.logits if hasattr(whole, "logits") else whole
    first = mask.argmax(-1)
    for row in range(b):                    # row 1 is left-padded: compare where the mask is 1
        torch.testing.assert_close(step_logits[row], whole[row, -s:], atol=1e-4, rtol=0)
        greedy = whole[row, first[row]:-1].argmax(-1)          # each token after the first is greedy
        assert torch.equal(greedy, text[row, first[row] + 1:]), (greedy, text[row])


def test_the_check_of_an_int8_cache_export_refuses_a_wrong_program(llama, tmp_path, monkeypatch):
    """The int8 latent is compared as the values it stands for: the export's own program passes,
    one whose latent values are negated (codes mirrored around 128) does not."""
    mla = mla_pass.convert(llama, MLAConfig(d_kv=6, rope_freqs=3), progress=False)
    seen = _spy_on_verify(monkeypatch)
    folder = to_onnx(mla, tmp_path / "q", latent_cache="int8")
    manifest = Manifest.read(folder)
    latent = [i for i, e in enumerate(manifest.cache) if e.dtype == "uint8"]
    assert latent, "no int8 latent in the manifest"

    class Mirrored(torch.nn.Module):
        def forward(self, *args):
            out = list(seen["wrapper"](*args))
            for i in latent:                                    # outputs: logits, then the cache
                out[1 + i] = (256 - out[1 + i].int()).clamp(0, 255).to(torch.uint8)
            return tuple(out)

    seen["real_verify"](folder, manifest, seen["wrapper"], seen["args"], "float32")
    with pytest.raises(ExportError, match="latent"):
        seen["real_verify"](folder, manifest, Mirrored(), seen["args"], "float32")
