"""The 8- and 4-bit latent caches: per-token quantization (and 4-bit packing), the integer attention
that reads them, the step-program surgery, and their export.

The exported int8 program must agree with the same program in PyTorch (logits ≤ 1e-4 over a
prefill and 32 decode steps, identical greedy tokens; both run the absorbed integer attention);
against the float cache it may differ only by the quantization error.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import tiny_llama

from mla_pass.quality.precision import cpu_flags

# onnxruntime's AVX2 u8s8 MatMulInteger kernel (no VNNI) adds byte products pairwise into int16 with
# saturation (vpmaddubsw): on such CPUs its products are wrong (measured: 95 of 370 entries off on a
# 2-core AVX2 machine), so comparisons with it only mean something where VNNI/AVX-512 is present
_FLAGS = cpu_flags() or set()
ORT_INT8_EXACT = pytest.mark.skipif(
    not _FLAGS & {"avx512bw", "avx512_vnni", "avx_vnni"},
    reason="this CPU has no AVX-512/VNNI: onnxruntime's AVX2 MatMulInteger saturates int16 sums (wrong products)")

import mla_pass
from mla_pass import MLAConfig
from mla_pass.lowering.int8_latent import to_int8_latent
from mla_pass.math.absorbed_mqa import absorbed_attention_mqa
from mla_pass.math.attention import absorbed_attention
from mla_pass.math.int8_cache import (ZERO_POINT, ZERO_POINT_4BIT, dequantize_per_token, quantize_per_token,
                                      quantize_per_token_int4, unpack_int4)
from mla_pass.modules.latent_attention import LatentAttention
from mla_pass.ops.matmul_integer import matmul_integer

onnx_export = pytest.importorskip("mla_pass.export.onnx", reason="the ONNX exporter needs onnx and onnxscript")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
from mla_pass.runtime import OnnxEngine  # noqa: E402
from mla_pass.runtime.manifest import Manifest  # noqa: E402

STEPS = 32


def test_per_token_quantization_error_is_half_a_step():
    x = torch.randn(3, 50, 24) * torch.rand(3, 50, 1) * 10
    x[1, 7] = 0
    q, s = quantize_per_token(x)
    assert q.dtype == torch.uint8 and s.shape == (3, 50)
    assert int(q.min()) >= 1                                               # codes + 128: [-127, 127] → [1, 255]
    back = dequantize_per_token(q, s)
    assert torch.all((back - x).abs() <= s[..., None] / 2 + 1e-6)
    assert torch.equal(back[1, 7], torch.zeros(24))                        # an all-zero token stays zero
    codes = (q.int() - ZERO_POINT).abs().amax(-1)
    assert torch.equal(codes[x.abs().amax(-1) > 0], torch.full_like(codes, 127)[x.abs().amax(-1) > 0])


@pytest.mark.parametrize("a_type,b_type,zps", [(torch.uint8, torch.int8, (128, 0)), (torch.uint8, torch.uint8, (0, 128)),
                                               (torch.int8, torch.int8, (0, 0))])
@ORT_INT8_EXACT
def test_matmul_integer_is_exact_in_pytorch_and_onnxruntime(a_type, b_type, zps, tmp_path):
    """The op and its ONNX translation (MatMulInteger): batched, with zero points, exact."""
    ort = pytest.importorskip("onnxruntime")
    g = torch.Generator().manual_seed(0)
    lo_a, lo_b = (0, 256) if a_type == torch.uint8 else (-128, 128), (0, 256) if b_type == torch.uint8 else (-128, 128)
    a = torch.randint(*lo_a, (2, 37, 19), generator=g, dtype=a_type)
    b = torch.randint(*lo_b, (2, 19, 5), generator=g, dtype=b_type)
    want = (a.long() - zps[0]) @ (b.long() - zps[1])
    got = matmul_integer(a, b, *zps)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)

    class Product(torch.nn.Module):
        def forward(self, a, b):
            return matmul_integer(a, b, *zps)
    program = torch.onnx.export(Product().eval(), (a, b), dynamo=True, opset_version=24,
                                custom_translation_table=onnx_export._translations(), verbose=False)
    program.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [n.op_type for n in program.model.graph if n.op_type == "MatMulInteger"] == ["MatMulInteger"]
    np.testing.assert_array_equal(session.run(None, {"a": a.numpy(), "b": b.numpy()})[0], want.numpy())


@pytest.mark.parametrize("width", [24, 7])
def test_4bit_codes_pack_two_a_byte_and_round_trip(width):
    x = torch.randn(3, 50, width) * torch.rand(3, 50, 1) * 10
    x[1, 7] = 0
    packed, s = quantize_per_token_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 50, (width + 1) // 2) and s.shape == (3, 50)
    codes = unpack_int4(packed, width)
    assert codes.shape == (3, 50, width) and int(codes.min()) >= 1 and int(codes.max()) <= 15   # [-7, 7] + 8
    back = dequantize_per_token(codes, s, ZERO_POINT_4BIT)
    assert torch.all((back - x).abs() <= s[..., None] / 2 + 1e-6)
    assert torch.equal(back[1, 7], torch.zeros(width))
    assert torch.equal((codes.int() - 8).abs().amax(-1)[x.abs().amax(-1) > 0], torch.full((149,), 7, dtype=torch.int32))
    # the layout the manifest states: channel 2i in the low nibble, 2i+1 in the high one, each code + 8
    assert torch.equal(packed[..., 0] % 16, codes[..., 0]) and torch.equal(packed[..., 0] // 16, codes[..., 1])
    if width % 2:
        assert torch.all(packed[..., -1] // 16 == 8)                      # the pad is code 0
    for bad in (packed[..., :-1], packed.to(torch.int8)):
        with pytest.raises(ValueError, match="a 4-bit latent of width"):
            unpack_int4(bad, width)


def test_matmul_integer_on_4bit_codes_is_exact_in_onnxruntime_on_any_cpu(tmp_path):
    """The 4-bit cache's bytes (≤ 15, zero point 8) as both GEMMs take them: exact in PyTorch and in
    onnxruntime, also with the AVX2 kernel that saturates larger bytes (not skipped on any CPU)."""
    ort = pytest.importorskip("onnxruntime")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(1, 16, (2, 37, 19), generator=g, dtype=torch.uint8)
    queries = torch.randint(-127, 128, (2, 19, 5), generator=g, dtype=torch.int8)
    weights = torch.randint(0, 256, (2, 5, 37), generator=g, dtype=torch.uint8)

    class Both(torch.nn.Module):
        def forward(self, codes, queries, weights):
            return (matmul_integer(codes, queries, ZERO_POINT_4BIT, 0),
                    matmul_integer(weights, codes, 0, ZERO_POINT_4BIT))
    want = [(codes.long() - 8) @ queries.long(), weights.long() @ (codes.long() - 8)]
    assert all(torch.equal(g.long(), w) for g, w in zip(Both()(codes, queries, weights), want))
    program = torch.onnx.export(Both().eval(), (codes, queries, weights), dynamo=True, opset_version=24,
                                custom_translation_table=onnx_export._translations(), verbose=False)
    program.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"codes": codes.numpy(), "queries": queries.numpy(), "weights": weights.numpy()})
    for g_, w in zip(got, want):
        np.testing.assert_array_equal(g_, w.numpy())


def test_4bit_integer_attention_equals_a_float64_reference_of_the_same_rounding():
    """integer_latent_attention over unpacked 4-bit codes against the same steps in float64: the
    queries and weights rounded the same way, the GEMMs in exact arithmetic."""
    from mla_pass.math.absorbed_mqa import integer_latent_attention
    from mla_pass.math.int8_cache import quantize_rows_int8, quantize_rows_uint8
    g = torch.Generator().manual_seed(1)
    b, h, s, t, c = 2, 4, 3, 29, 13
    q = torch.randn(b, h, s, c, generator=g)
    packed, scale = quantize_per_token_int4(torch.randn(b, t, c, generator=g))
    codes = unpack_int4(packed, c)
    bias = torch.randn(b, h, s, t, generator=g)
    got = integer_latent_attention(q, codes, scale, None, bias, ZERO_POINT_4BIT)
    values = codes.double() - 8                                                   # [B,T,C] the 4-bit codes
    q_codes, q_scale = quantize_rows_int8(q.reshape(b, h * s, c))
    scores = (q_codes.double() @ values.transpose(1, 2)) * q_scale.double() * scale.double()[:, None, :]
    weights = torch.softmax(scores.float().reshape(b, h, s, t) + bias, -1).reshape(b, h * s, t) * scale[:, None, :]
    w_codes, w_scale = quantize_rows_uint8(weights)
    want = ((w_codes.double() @ values) * w_scale.double()).reshape(b, h, s, c)
    assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_matmul_integer_refuses_a_zero_point_on_a_signed_operand():
    with pytest.raises(ValueError, match="zero point"):
        matmul_integer(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), 128, 0)
    with pytest.raises(TypeError, match="uint8/int8"):
        matmul_integer(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int8), 0, 0)


def test_integer_attention_is_close_to_attention_over_the_dequantized_latent():
    """8-bit queries and weights (one scale per row) on top of the 8-bit cache: a small error,
    not a different function."""
    g = torch.Generator().manual_seed(0)
    b, h, n_kv, s, t, n, r, c, v = 2, 6, 3, 1, 40, 5, 4, 12, 7
    q_nope, q_rope = torch.randn(b, h, s, n, generator=g), torch.randn(b, h, s, r, generator=g)
    latent, scale = quantize_per_token(torch.randn(b, t, c, generator=g))
    k_rope = torch.randn(b, 1, t, r, generator=g)
    up_k, up_v = torch.randn(n_kv, n, c, generator=g), torch.randn(n_kv, v, c, generator=g)
    kv = torch.arange(h) // (h // n_kv)
    mask = torch.ones(b, 1, s, t, dtype=torch.bool)
    mask[1, ..., :9] = False
    got = absorbed_attention_mqa(q_nope, q_rope, latent, k_rope, up_k, up_v, None, kv, 0.3, mask, latent_scale_BT=scale)
    want = absorbed_attention(q_nope, q_rope, dequantize_per_token(latent, scale), k_rope, up_k, up_v, None, kv, 0.3, mask)
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 2e-2, rel


@pytest.fixture(scope="module")
def converted():
    return mla_pass.convert(tiny_llama(n_kv=2), MLAConfig(d_kv=6, rope_freqs=3), progress=False)


@pytest.fixture(scope="module")
def int8_folder(converted, tmp_path_factory):
    return onnx_export.to_onnx(converted, tmp_path_factory.mktemp("int8") / "out", max_length=128, latent_cache="int8")


@pytest.fixture(scope="module")
def int4_folder(converted, tmp_path_factory):
    return onnx_export.to_onnx(converted, tmp_path_factory.mktemp("int4") / "out", max_length=128, latent_cache="int4")


def test_manifest_and_bytes_per_token(converted, int8_folder):
    manifest = Manifest.read(int8_folder)
    kinds = [e.input.rsplit(".", 1)[1] for e in manifest.cache]
    assert kinds == ["latent", "rope_key", "latent_scale"] * len(converted.plans)
    by_kind = {e.input.rsplit(".", 1)[1]: e for e in manifest.cache}
    assert by_kind["latent"].dtype == "uint8" and by_kind["latent_scale"].dtype == "float32"
    assert by_kind["latent_scale"].shape == ["batch", "past"] and by_kind["latent_scale"].time_axis == 1
    per_site = [p.latent_dim * 1 + p.rope_width * 4 + 4 for p in converted.plans.values()]
    assert manifest.kv_cache_bytes_per_token() == sum(per_site)
    assert manifest.kv_cache_bytes_per_token() < converted.kv_cache_bytes_per_token(dtype=torch.float32)


@ORT_INT8_EXACT
def test_onnxruntime_agrees_with_the_int8_program_over_32_decode_steps(converted, int8_folder):
    _agrees_over_32_decode_steps(converted, int8_folder, "int8")


def test_onnxruntime_agrees_with_the_int4_program_over_32_decode_steps(converted, int4_folder):
    """Not skipped on AVX2: the 4-bit codes' byte products never saturate onnxruntime's kernel."""
    _agrees_over_32_decode_steps(converted, int4_folder, "int4")


def test_manifest_states_the_4bit_layout_and_its_bytes(converted, int4_folder):
    manifest = Manifest.read(int4_folder)
    by_kind = {e.input.rsplit(".", 1)[1]: e for e in manifest.cache}
    width = converted.plans[0].latent_dim
    assert by_kind["latent"].dtype == "uint8" and by_kind["latent"].shape == ["batch", "past", (width + 1) // 2]
    assert manifest.notes["latent_cache"].startswith("4-bit, packed two a byte")
    per_site = [(p.latent_dim + 1) // 2 + p.rope_width * 4 + 4 for p in converted.plans.values()]   # scales included
    assert manifest.kv_cache_bytes_per_token() == sum(per_site)
    assert manifest.notes["verify_worst_relative_rms_error"] <= 0.5


def _agrees_over_32_decode_steps(converted, folder, bits):
    """The runtime (in-place buffers, IO binding) next to the PyTorch program of the same rounding
    (concat), both in the forms the exporter writes: the prompt decompressed from the dequantized
    latent, every one-token step absorbed (the integer attention)."""
    step, spec = to_int8_latent(copy.deepcopy(converted.step), converted.cache_spec, bits)
    for m in step.modules():
        if isinstance(m, LatentAttention):
            m.form = "auto"
    engine = OnnxEngine(folder, threads=1)
    ids = torch.randint(0, converted.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    b, s = ids.shape
    kv = engine.new_cache(b, s + STEPS + 1)
    dtype_of = {"latent": torch.uint8}
    torch_cache = [torch.zeros(converted.plans[t.site].cache_shape(t.kind, b, 0), dtype=dtype_of.get(t.kind, torch.float32))
                   for t in spec]
    if bits == "int4":                                  # two codes a byte
        torch_cache = [c[..., :(c.shape[-1] + 1) // 2] if t.kind == "latent" else c
                       for c, t in zip(torch_cache, spec)]
    mask = torch.ones(b, s, dtype=torch.long)
    cur_ort = cur_torch = ids
    errors, tokens_ort, tokens_torch = [], [], []
    for _ in range(STEPS + 1):
        pos = (mask.cumsum(-1) - 1)[:, -cur_ort.shape[1]:]
        out = engine.step(cur_ort.numpy(), mask.numpy(), pos.numpy(), kv)
        with torch.no_grad():
            logits, *torch_cache = step(cur_torch, pos, mask, *torch_cache)
        errors.append(float(np.abs(out.logits[:, -1] - logits[:, -1].numpy()).max()))
        tokens_ort.append(out.logits[:, -1].argmax(-1))
        tokens_torch.append(logits[:, -1].argmax(-1).numpy())
        cur_ort, cur_torch = torch.from_numpy(tokens_ort[-1])[:, None], torch.from_numpy(tokens_torch[-1])[:, None]
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
    assert max(errors) <= 1e-4, errors
    np.testing.assert_array_equal(np.stack(tokens_ort), np.stack(tokens_torch))
    assert torch_cache[0].dtype == torch.uint8 and torch_cache[0].shape[1] == s + STEPS


@pytest.mark.parametrize("bits,bound", [("int8", 0.05), ("int4", 0.3)])
def test_quantized_cache_stays_close_to_the_float_cache(converted, bits, bound):
    step, spec = to_int8_latent(copy.deepcopy(converted.step), converted.cache_spec, bits)
    ids = torch.randint(0, converted.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    pos = torch.arange(24)[None]
    with torch.no_grad():
        out = converted(ids)
        want = getattr(out, "logits", out)
        cache = [torch.zeros(converted.plans[t.site].cache_shape(t.kind, 1, 0),
                             dtype=torch.uint8 if t.kind == "latent" else torch.float32) for t in spec]
        if bits == "int4":                              # two codes a byte
            cache = [c[..., :(c.shape[-1] + 1) // 2] if t.kind == "latent" else c for c, t in zip(cache, spec)]
        got = step(ids, pos, mask, *cache)[0]
    rel = (got - want).abs().max() / want.abs().max()
    assert 0 < rel < bound, f"the {bits} latent changes the logits by {rel:.3%} of their range"


def test_bad_requests(converted, tmp_path):
    with pytest.raises(ValueError, match="latent_cache must be one of"):
        onnx_export.to_onnx(converted, tmp_path / "a", latent_cache="int2")
    for bits in ("int8", "int4"):
        with pytest.raises(ValueError, match="needs a converted model"):
            onnx_export.to_onnx(tiny_llama(n_kv=2), tmp_path / "b", latent_cache=bits)
    step, spec = to_int8_latent(copy.deepcopy(converted.step), converted.cache_spec)
    with pytest.raises(ValueError, match="already has an int8 latent cache"):
        to_int8_latent(step, spec, "int4")
    with pytest.raises(ValueError, match="bits must be one of"):
        to_int8_latent(copy.deepcopy(converted.step), converted.cache_spec, "int2")
