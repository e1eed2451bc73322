"""End to end: a tiny converted model exported by mla_pass.export.to_onnx, run by the runtime.

The runtime's greedy tokens must equal ``MLAModel.generate``'s, alone and in a left-padded
batch. One export (~30 s on 2 cores) serves every test in the file.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_llama

import mla_pass
from mla_pass import MLAConfig
from mla_pass.runtime import OnnxEngine

PROMPT_LENGTHS = (7, 3, 11)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    to_onnx = pytest.importorskip("mla_pass.export.onnx", reason="the ONNX exporter needs onnx/onnxscript").to_onnx
    model = tiny_llama(n_kv=2)
    mla = mla_pass.convert(model, MLAConfig(d_kv=8, rope_freqs=4))
    folder = to_onnx(mla, tmp_path_factory.mktemp("export") / "mla", max_length=64)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, mla.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    return mla, OnnxEngine(folder, threads=1), prompts


def test_greedy_tokens_equal_mla_generate(exported):
    mla, engine, prompts = exported
    assert engine.manifest.kind == "mla"
    assert engine.manifest.kv_cache_bytes_per_token() == mla.kv_cache_bytes_per_token(dtype=torch.float32)
    for p in prompts:
        want = mla.generate(torch.tensor([p]), max_new_tokens=24)[0, len(p):].tolist()
        assert engine.generate([p], max_new_tokens=24).token_ids[0] == want


def test_batch_equals_one_at_a_time(exported):
    mla, engine, prompts = exported
    batch = engine.generate(prompts, max_new_tokens=16)
    for p, got in zip(prompts, batch.token_ids):
        assert got == engine.generate([p], max_new_tokens=16).token_ids[0]
        want = mla.generate(torch.tensor([p]), max_new_tokens=16)[0, len(p):].tolist()
        assert got == want


def test_step_logits_equal_the_torch_step(exported):
    """Prefill then 8 decode steps through a bound KVCache: logits ≤ 1e-4 of the PyTorch step program."""
    mla, engine, prompts = exported
    ids = prompts[2]
    kv = engine.new_cache(1, len(ids) + 8)
    mask = np.ones((1, len(ids)), np.int64)
    logits = engine.step(np.array([ids]), mask, cache=kv).logits
    with torch.no_grad():
        want, *past = mla.step_with_cache(torch.tensor([ids]), torch.from_numpy(mask), mla.empty_cache(1))
    for t in range(9):
        err = float(np.abs(logits - want.numpy()).max())
        assert err <= 1e-4, f"step {t}: logits differ by {err:.2e} (allowed 1e-4)"
        if t == 8:
            break
        nxt = int(want[0, -1].argmax())
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        logits = engine.step(np.array([[nxt]]), mask, cache=kv).logits
        with torch.no_grad():
            want, *past = mla.step_with_cache(torch.tensor([[nxt]]), torch.from_numpy(mask), past)
    for a, b in zip(kv.arrays(), past):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4)


def test_chunked_prefill_equals_one_step_and_the_torch_prefill(exported):
    """A left-padded batch prefilled 4 tokens per step through the exported program: the last logits
    equal one-step prefill's and PyTorch's over the whole prompt (≤ 1e-4 fp32)."""
    mla, engine, prompts = exported
    width = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), width), np.int64), np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    one_step = engine.prefill(ids, mask, engine.new_cache(len(prompts), width), chunk=width)
    chunked = engine.prefill(ids, mask, engine.new_cache(len(prompts), width), chunk=4)
    with torch.no_grad():
        want, *_ = mla.step_with_cache(torch.from_numpy(ids), torch.from_numpy(mask), mla.empty_cache(len(prompts)))
    for got in (one_step, chunked):
        err = float(np.abs(got - want[:, -1].numpy()).max())
        assert err <= 1e-4, f"last logits differ from PyTorch's by {err:.2e} (allowed 1e-4)"
