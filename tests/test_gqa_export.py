"""The unconverted baseline's in-place export runs each attention site as one com.microsoft
GroupQueryAttention node (lowering.group_query.use_group_query_attention, ops.group_query_attention).

Checked: the PyTorch op has onnxruntime's semantics (ragged rows, right-padded chunks, softcap);
the in-place program equals the concatenating one (left padding, chunks, garbage beyond T+S);
the exported graph holds the node; and through the runtime (past and present bound to one
buffer) a left-padded batch, a chunked prefill (S > 1 after a past) and 32 decode steps agree
with PyTorch (logits ≤ 1e-4) and reproduce Hugging Face's greedy tokens.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import tiny_llama
from tiny_decoder import TinyConfig, TinyDecoder

from mla_pass.baseline import kv_step_program
from mla_pass.lowering.group_query import use_group_query_attention
from mla_pass.lowering.in_place import to_in_place
from mla_pass.modules.kv_attention import KVCacheAttention, KVPlan
from mla_pass.ops.group_query_attention import group_query_attention

onnx = pytest.importorskip("onnx", reason="the ONNX exporter needs onnx")
onnx_export = pytest.importorskip("mla_pass.export.onnx", reason="the ONNX exporter needs onnx and onnxscript")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
from mla_pass.runtime import OnnxEngine  # noqa: E402
from mla_pass.runtime.manifest import Manifest  # noqa: E402

DECODE_STEPS = 32


class _Op(torch.nn.Module):
    def __init__(self, heads, kv_heads, scale, softcap):
        super().__init__()
        self.attrs = (heads, kv_heads, scale, softcap)

    def forward(self, *inputs):
        return group_query_attention(*inputs, *self.attrs)


def test_op_has_onnxruntime_semantics_for_ragged_rows_and_padded_chunks(tmp_path):
    """Rows of different lengths, a right-padded chunk, softcap, garbage beyond each row: the
    exported node and the PyTorch op agree on every specified value."""
    heads, kv_heads, d, cap, s = 4, 2, 8, 12, 3
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    lengths, valid = torch.tensor([9, 3]), torch.tensor([3, 2])      # row 1: 1 cached + 2 new, 1 padding
    past_k, past_v = rand(2, kv_heads, cap, d), rand(2, kv_heads, cap, d)
    past_k[1, :, 1:], past_v[1, :, 1:] = 1e4, 1e4                     # never read
    bias = torch.zeros(2, 1, s, 9)
    bias[0, 0, :, 2] = float("-inf")                                  # a masked key
    inputs = (rand(2, s, heads * d), rand(2, s, kv_heads * d), rand(2, s, kv_heads * d), past_k, past_v,
              (lengths - 1).int(), torch.tensor(9, dtype=torch.int32), bias, valid.int())
    module = _Op(heads, kv_heads, 0.3, 5.0).eval()
    with torch.no_grad():
        want = module(*inputs)
    program = torch.onnx.export(module, inputs, dynamo=True, opset_version=24,
                                custom_translation_table=onnx_export._translations(), verbose=False)
    program.save(str(tmp_path / "op.onnx"))
    session = ort.InferenceSession(str(tmp_path / "op.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    assert [n.op_type for n in onnx.load(str(tmp_path / "op.onnx")).graph.node] == ["GroupQueryAttention"]
    for row, (length, q) in enumerate(zip(lengths.tolist(), valid.tolist())):
        np.testing.assert_allclose(got[0][row, :q], want[0][row, :q].numpy(), atol=1e-5)
        for g, w in zip(got[1:], want[1:]):
            np.testing.assert_allclose(g[row, :, :length], w[row, :, :length].numpy(), atol=1e-6)


def test_sites_group_query_attention_cannot_express_are_named():
    plan = {"index": 0, "layer": "l0", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "value_dim": 8, "scale": 0.3,
            "softcap": None}
    assert KVPlan(**plan, kv_head_of_query=[0, 0, 1, 1]).group_query_attention_refusal() is None
    assert "repeat_kv order" in KVPlan(**plan, kv_head_of_query=[0, 1, 0, 1]).group_query_attention_refusal()
    wide = KVPlan(**{**plan, "value_dim": 16}, kv_head_of_query=[0, 0, 1, 1])
    assert "head size 16" in wide.group_query_attention_refusal()


def _step_inputs(ids, mask, lo, hi):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids[:, lo:hi], pos[:, lo:hi], mask[:, :hi]


def _logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("make", [lambda: tiny_llama(n_kv=2),
                                  lambda: TinyDecoder(TinyConfig(attention="eager", softcap=2.0, vocab=128))],
                         ids=["llama-gqa", "eager-softcap"])
def test_in_place_program_equals_the_model(make):
    """Left-padded batch over buffers full of garbage: prefill, a 2-token chunk after a past, decode
    steps; each row's logits equal the model's own forward over that row's real tokens."""
    model = make()
    program = kv_step_program(model)
    step = to_in_place(copy.deepcopy(program.step))
    assert use_group_query_attention(step) == {}
    kinds = {m.op for m in step.modules() if isinstance(m, KVCacheAttention)}
    assert kinds == {"group_query_attention"}
    assert not any(n.target == "cache_mask_in_place" for n in step.graph.nodes)   # no [B,1,S,T_max] mask left
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    capacity = 13
    buffers = [torch.full(program.plans[c.site].cache_shape(c.kind, 2, capacity), 1e4) for c in program.cache_spec]
    with torch.no_grad():
        full = [_logits(model, ids[row, mask[row].bool()][None])[0] for row in range(2)]
        for lo, hi in ((0, 6), (6, 8), (8, 9), (9, 10)):       # prefill, a chunk of 2 after a past, decode
            got, *buffers = step(*_step_inputs(ids, mask, lo, hi), *buffers)
            assert all(b.shape[2] == capacity for b in buffers)
            for row in range(2):                               # padded query rows compute garbage
                pad = int((mask[row] == 0).sum())
                real = got[row, max(lo, pad) - lo:]
                assert (real - full[row][max(lo, pad) - pad:hi - pad]).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_llama(n_kv=2)
    return model, onnx_export.to_onnx(model, tmp_path_factory.mktemp("gqa") / "out", max_length=128)


def test_use_group_query_attention_needs_an_in_place_baseline(exported):
    program = kv_step_program(exported[0])
    with pytest.raises(ValueError, match="to_in_place"):
        use_group_query_attention(copy.deepcopy(program.step))


def test_exported_graph_runs_group_query_attention(exported):
    _, folder = exported
    manifest = Manifest.read(folder)
    assert manifest.notes["attention"] == "com.microsoft GroupQueryAttention at 2 of 2 sites"
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nodes = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == 2 and all(n.domain == "com.microsoft" for n in nodes)
    assert not {"Attention", "TensorScatter"} & {n.op_type for n in graph.graph.node}   # GQA writes the cache
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2 and "do_rotary" not in attrs
    assert attrs["scale"] == pytest.approx(16 ** -0.5)
    # past and present of each site are the graph's cache I/O, so the runtime can bind them to one buffer
    assert [nodes[0].input[3], nodes[0].output[1]] == ["past_key_values.0.key", "present.0.key"]


def test_runtime_left_padded_batch_chunked_prefill_and_32_steps(exported):
    """Through OnnxEngine with a KVCache (past and present are one buffer): prefill, a 2-token
    chunk after it, then 32 greedy steps; PyTorch's concatenating program alongside."""
    model, folder = exported
    program = kv_step_program(model)
    engine = OnnxEngine(folder, threads=1)
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 4)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    kv = engine.new_cache(2, width + DECODE_STEPS + 1)
    past = program.empty_cache(2)
    tokens, errors = [], []
    chunks = [(0, 5), (5, width)]                                  # row 1's prompt starts inside the first chunk
    with torch.no_grad():
        for i in range(len(chunks) + DECODE_STEPS):
            lo, hi = chunks[i] if i < len(chunks) else (mask.shape[1] - 1, mask.shape[1])
            step_ids, pos, step_mask = _step_inputs(ids, mask, lo, hi)
            got = engine.step(step_ids.numpy(), step_mask.numpy(), pos.numpy(), kv).logits
            want, *past = program.step(step_ids, pos, step_mask, *past)
            if i < len(chunks) - 1:
                continue
            errors.append(float(np.abs(got[:, -1] - want[:, -1].numpy()).max()))
            nxt = torch.from_numpy(got[:, -1].argmax(-1))
            assert torch.equal(nxt, want[:, -1].argmax(-1))
            tokens.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert max(errors) <= 1e-4, f"max |Δlogits| per step: {errors}"
    assert kv.length == width + DECODE_STEPS
    tokens = torch.stack(tokens, 1)
    for row, prompt in enumerate(prompts):
        want = model.generate(prompt[None], max_new_tokens=DECODE_STEPS + 1, do_sample=False)[0, len(prompt):]
        assert torch.equal(tokens[row], want), f"row {row}"


@pytest.mark.parametrize("options", [{"dtype": "float16"}, {"quantize": "int8"}], ids=["fp16", "int8"])
def test_float16_and_int8_exports_keep_group_query_attention(options, tmp_path):
    """Both pass the export's own check against PyTorch (fp16: 2e-2 of the largest value)."""
    folder = onnx_export.to_onnx(tiny_llama(n_kv=2), tmp_path / "out", **options)
    assert Manifest.read(folder).notes["attention"].startswith("com.microsoft GroupQueryAttention at 2 of 2")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.graph.node) == 2
