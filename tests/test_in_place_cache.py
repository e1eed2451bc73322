"""lowering.in_place.to_in_place: a step program over preallocated cache buffers computes what the
concatenating one computes (converted and baseline programs, left-padded batch, prefill then
decode steps), and never reads the buffer beyond T+S."""
import copy

import pytest
import torch
from helpers import tiny_llama

import mla_pass
from mla_pass import MLAConfig
from mla_pass.baseline import kv_step_program
from mla_pass.lowering.in_place import to_in_place
from mla_pass.ops.cache_write import cache_write


@pytest.fixture(scope="module")
def programs():
    model = tiny_llama(n_kv=2)
    mla = mla_pass.convert(model, MLAConfig(d_kv=6, rope_freqs=2), progress=False)
    base = kv_step_program(model)
    return {"mla": (mla.step, mla.plans, mla.cache_spec), "baseline": (base.step, base.plans, base.cache_spec)}


@pytest.mark.parametrize("which", ["mla", "baseline"])
def test_in_place_equals_concat(programs, which):
    step, plans, spec = programs[which]
    in_place = to_in_place(copy.deepcopy(step))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0                                                   # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    capacity = 12
    # garbage beyond T+S must never be read: fill the buffers with huge values
    buffers = [torch.full(plans[c.site].cache_shape(c.kind, 2, capacity), 1e4) for c in spec]
    past = [torch.zeros(plans[c.site].cache_shape(c.kind, 2, 0)) for c in spec]
    with torch.no_grad():
        for lo, hi in ((0, 6), (6, 7), (7, 8), (8, 10)):              # prefill, then steps of 1 and 2 tokens
            want, *past = step(ids[:, lo:hi], pos[:, lo:hi], mask[:, :hi], *past)
            got, *buffers = in_place(ids[:, lo:hi], pos[:, lo:hi], mask[:, :hi], *buffers)
            assert (got - want).abs().max() <= 1e-5
            for b, p, c in zip(buffers, past, spec):
                axis = 1 if c.kind == "latent" else 2
                assert torch.allclose(b.narrow(axis, 0, hi), p, atol=1e-6)
                assert b.shape[axis] == capacity


def test_cache_write_writes_each_row_at_its_index():
    buffer = torch.zeros(2, 3, 6, 2)
    new = torch.ones(2, 3, 2, 2)
    out = cache_write(buffer, new, torch.tensor([1, 4]), 2)
    assert out[0, :, 1:3].eq(1).all() and out[0, :, 3:].eq(0).all() and out[0, :, :1].eq(0).all()
    assert out[1, :, 4:6].eq(1).all() and out[1, :, :4].eq(0).all()
    assert buffer.eq(0).all()                                         # functional: the input is untouched
