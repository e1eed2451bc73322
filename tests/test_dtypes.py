"""Half-precision models convert too (probing runs in float64; tolerances follow the dtype)."""
import pytest
import torch

import mla_pass
from helpers import tiny_llama


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
