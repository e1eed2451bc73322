"""Half-precision models convert too (probing runs in float64; tolerances follow the dtype)."""
import pytest
import torch
from helpers import tiny_llama

import mla_pass


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_half_precision_full_rank(dtype, tol):
    model = tiny_llama().to(dtype)
    mla = mla_pass.convert(model, progress=False)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(ids).logits.float(), mla(ids)
    assert out.dtype == dtype
    err = (ref - out.float()).abs().max().item()
    assert err <= tol, f"{dtype}: max |Δlogits| {err:.2e} > {tol}"
    assert [t.dtype for t in mla.empty_cache(1)] == [dtype] * len(mla.cache_spec)
    assert mla.kv_cache_bytes_per_token(dtype) == 2 * 2 * 2 * 16 * 2


def test_casting_a_converted_model_is_a_clear_error():
    """The captured program keeps the capture dtype's casts, so mla.to(other dtype) would build a
    program that fails on its first matmul: refuse it up front, leave the model usable."""
    mla = mla_pass.convert(tiny_llama(), mla_pass.MLAConfig(d_kv=4, rope_freqs=2), progress=False)
    with pytest.raises(TypeError, match=r"converted in torch.float32.*model.to\(torch.bfloat16\) before mla_pass.convert"):
        mla.to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    assert mla.to("cpu").float()(ids).dtype == torch.float32      # device moves and same-dtype casts still work


def test_moving_a_converted_model_retargets_its_program():
    """Device constants baked at capture (HF's inv_freq.to(x.device), arange(device=...)) follow
    mla.to(device): here to the meta device, which needs no GPU."""
    mla = mla_pass.convert(tiny_llama(), mla_pass.MLAConfig(d_kv=4, rope_freqs=2), progress=False)
    devices = lambda graph: {str(a) for n in graph.nodes for a in (*n.args, *n.kwargs.values())  # noqa: E731
                             if isinstance(a, torch.device)}
    assert devices(mla.step.graph) == {"cpu"}
    mla.to("meta")
    assert devices(mla.program.graph) == devices(mla.step.graph) == {"meta"}
    assert {p.device.type for p in mla.parameters()} == {"meta"}
