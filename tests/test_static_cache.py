"""The static-cache decode (``lowering.static_cache``, ``decode.StaticCacheDecoder``): buffers
allocated once and written in place, one shape per decode step, so CUDA graphs can capture it.

On CPU it must equal today's growing-cache decode: logits ≤ 1e-5 at every step, identical greedy
tokens (every family at full rank: tests/test_families.py; here a reduced-rank calibrated model
and the unconverted baseline). The decode step must trace as one graph (``fullgraph=True``), the
precondition of ``torch.compile(mode="reduce-overhead")`` capturing it.
"""
from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama, tiny_qwen2

import mla_pass
from mla_pass import MLAConfig
from mla_pass.baseline import kv_step_program
from mla_pass.decode import StaticCacheDecoder
from mla_pass.lowering.static_cache import to_static_cache


@pytest.fixture(scope="module")
def converted():
    model = tiny_qwen2()              # q/k/v biases, GQA
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    return mla_pass.convert(model, MLAConfig(d_kv=6, rope_freqs=3), calibration=calibration, progress=False)


def _prompt():
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def _side_by_side(step_with_cache, empty_cache, decoder, ids, mask, steps=16) -> float:
    cache, cur, worst = empty_cache(ids.shape[0]), ids, 0.0
    with torch.no_grad():
        for _ in range(steps + 1):
            want, *cache = step_with_cache(cur, mask, cache)
            got = decoder(cur, mask)
            worst = max(worst, float((got - want).abs().max()))
            cur = want[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(cur)], dim=1)
    return worst


def test_reduced_rank_static_decode_equals_the_growing_cache(converted):
    mla = converted
    assert all(p.rope_mixed for p in mla.plans.values())
    ids, mask = _prompt()
    decoder = StaticCacheDecoder(mla.step, mla.cache_spec, mla.plans, batch=2, capacity=9 + 17)
    worst = _side_by_side(mla.step_with_cache, mla.empty_cache, decoder, ids, mask)
    assert worst <= 1e-5, f"logits differ by {worst:.2e} (allowed 1e-5)"
    assert decoder.length == 9 + 16
    growing = mla.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, static_cache=False)
    static = mla.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, static_cache=True)
    assert torch.equal(static, growing)


def test_baseline_static_decode_equals_the_growing_cache():
    """The unconverted baseline (the GPU benchmark's original) runs the same static program."""
    program = kv_step_program(tiny_llama(n_kv=2))
    ids, mask = _prompt()

    def step_with_cache(cur, m, cache):
        pos = (m.cumsum(-1) - 1).clamp(min=0)[:, -cur.shape[1]:]
        return program.step(cur, pos, m, *cache)

    decoder = StaticCacheDecoder(program.step, program.cache_spec, program.plans, batch=2, capacity=9 + 17)
    worst = _side_by_side(step_with_cache, program.empty_cache, decoder, ids, mask)
    assert worst <= 1e-5, f"logits differ by {worst:.2e} (allowed 1e-5)"


def test_the_decode_step_traces_as_one_graph_and_leaves_the_step_as_it_was(converted):
    mla = converted
    before = {n: getattr(m, "cache_update", None) for n, m in mla.step.named_modules()}
    ids, mask = _prompt()
    eager = StaticCacheDecoder(mla.step, mla.cache_spec, mla.plans, batch=2, capacity=12)
    traced = StaticCacheDecoder(mla.step, mla.cache_spec, mla.plans, batch=2, capacity=12)
    torch._dynamo.reset()
    traced._decode_step = torch.compile(traced._run, backend="eager", fullgraph=True)   # a graph break raises
    with torch.no_grad():
        for d in (eager, traced):
            d(ids, mask)
        cur, m = torch.tensor([[5], [6]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        for _ in range(2):          # the second step reuses the first one's graph: no shape changed
            want, got = eager(cur, m), traced(cur, m)
            assert float((want - got).abs().max()) <= 1e-6
            m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1)
    assert {n: getattr(m, "cache_update", None) for n, m in mla.step.named_modules()} == before
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(mla.step.parameters(), eager.program.parameters()))


def test_bad_use_is_refused_with_what_to_do(converted):
    mla = converted
    ids, mask = _prompt()
    decoder = StaticCacheDecoder(mla.step, mla.cache_spec, mla.plans, batch=2, capacity=10)
    with pytest.raises(ValueError, match="built for batch 2"):
        decoder(ids[:1], mask[:1])
    with pytest.raises(ValueError, match="attention_mask must be"):
        decoder(ids, mask[:, :5])
    decoder(ids, mask)
    m = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    decoder(torch.tensor([[1], [2]]), m)
    with pytest.raises(ValueError, match="do not fit the static cache of 10"):
        decoder(torch.tensor([[1], [2]]), torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1))
    with pytest.raises(ValueError, match="compile must be None or one of"):
        StaticCacheDecoder(mla.step, mla.cache_spec, mla.plans, batch=2, capacity=4, compile="max-autotune")
    for bad in (dict(batch=0), dict(capacity=0), dict(capacity=True)):
        with pytest.raises(ValueError, match="must be an integer"):
            StaticCacheDecoder(mla.step, mla.cache_spec, mla.plans, **{"batch": 2, "capacity": 4, **bad})
    with pytest.raises(ValueError, match="pass static_cache=True too"):
        mla.generate(ids, max_new_tokens=2, compile=True, static_cache=False)
    with pytest.raises(ValueError, match="static_cache must be True or False"):
        mla.generate(ids, max_new_tokens=2, static_cache="yes")
    lowered = to_static_cache(mla.step)
    with pytest.raises(ValueError, match="not a lowered one"):
        to_static_cache(lowered)
