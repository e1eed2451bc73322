"""Pure math: SVD factorisation, rope selection, the two attention forms."""
import pytest
import torch

from mla_pass.math.attention import (absorbed_attention, decompressed_attention, in_repeat_kv_order,
                                     latent_output, latent_query, per_query_head)
from mla_pass.math.rope import select_pairs, two_norm_scores
from mla_pass.math.svd import factorize_kv, full_latent_dim


@pytest.mark.parametrize("mode", ["joint", "split"])
def test_full_rank_factorisation_is_exact(mode):
    g = torch.Generator().manual_seed(0)
    wk, wv = torch.randn(2, 6, 40, generator=g), torch.randn(2, 8, 40, generator=g)
    c = full_latent_dim(12, 16, 40, mode)
    low = factorize_kv(wk, wv, c, mode)
    rec_k = torch.einsum("jnc,cd->jnd", low.up_key, low.down)
    rec_v = torch.einsum("jvc,cd->jvd", low.up_value, low.down)
    assert (rec_k - wk).abs().max() < 1e-5 and (rec_v - wv).abs().max() < 1e-5


def test_truncation_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    wk, wv = torch.randn(2, 6, 40, generator=g), torch.randn(2, 8, 40, generator=g)
    low = factorize_kv(wk, wv, 10)
    w = torch.cat([wk.reshape(-1, 40), wv.reshape(-1, 40)])
    rec = torch.cat([low.up_key.reshape(-1, 10), low.up_value.reshape(-1, 10)]) @ low.down
    s = torch.linalg.svdvals(w.double())
    err = torch.linalg.matrix_norm((w - rec).double())
    assert torch.isclose(err, s[10:].norm(), rtol=1e-4)          # Eckart–Young
    assert torch.allclose(low.down @ low.down.T, torch.eye(10), atol=1e-5)


def test_rank_above_full_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        factorize_kv(torch.randn(1, 2, 3), torch.randn(1, 2, 3), 5)


def test_select_pairs_strategies():
    speeds = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03]
    assert select_pairs("high", speeds, 2, 2) == [[0, 1], [0, 1]]
    assert select_pairs("low", speeds, 2, 1) == [[4, 5]]
    assert select_pairs("uniform", speeds, 3, 1) == [[0, 2, 5]] or select_pairs("uniform", speeds, 3, 1) == [[0, 3, 5]]
    scores = torch.tensor([[0.0, 5, 1, 9, 0, 0], [7, 0, 0, 0, 8, 1]])
    assert select_pairs("2-norm", speeds, 2, 2, scores) == [[1, 3], [0, 4]]
    with pytest.raises(ValueError, match="rotates only 6"):
        select_pairs("high", speeds, 7, 1)


def test_two_norm_sums_over_the_group():
    q = torch.tensor([[1.0, 2], [3, 4], [5, 6]])     # 3 query heads
    k = torch.tensor([[1.0, 1], [2, 0]])             # 2 kv heads
    s = two_norm_scores(q, k, (0, 0, 1))
    assert torch.equal(s, torch.tensor([[4.0, 6], [10, 0]]))


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_absorbed_equals_decompressed(softcap):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, T, N, R, C, V = 2, 6, 2, 3, 7, 5, 4, 9, 8
    kv_map = torch.tensor([0, 0, 0, 1, 1, 1])
    q_nope, q_rope = torch.randn(B, H, S, N, generator=g), torch.randn(B, H, S, R, generator=g)
    latent, k_rope = torch.randn(B, T, C, generator=g), torch.randn(B, 1, T, R, generator=g)
    up_k, up_v = torch.randn(Hkv, N, C, generator=g), torch.randn(Hkv, V, C, generator=g)
    b_k, b_v = torch.randn(Hkv, N, generator=g), torch.randn(Hkv, V, generator=g)
    mask = torch.ones(S, T, dtype=torch.bool).tril(T - S)[None, None].expand(B, 1, S, T)
    k_nope = torch.einsum("btc,jnc->bjtn", latent, up_k) + b_k[None, :, None]
    v = torch.einsum("btc,jvc->bjtv", latent, up_v) + b_v[None, :, None]
    ref = decompressed_attention(q_nope, q_rope, k_nope, k_rope, v, kv_map, 0.3, mask, softcap=softcap)
    out = absorbed_attention(q_nope, q_rope, latent, k_rope, up_k, up_v, b_v, kv_map, 0.3, mask, softcap=softcap,
                             b_key_HkvN=b_k)
    assert (ref - out).abs().max() < 1e-4


def _activations(d=40, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)      # anisotropic, like real activations
    return torch.randn(n, d, generator=g) @ mix.T


@pytest.mark.parametrize("mode", ["joint", "split"])
def test_activation_aware_is_exact_at_full_rank(mode):
    g = torch.Generator().manual_seed(1)
    wk, wv = torch.randn(2, 6, 40, generator=g), torch.randn(2, 8, 40, generator=g)
    x = _activations().double()
    low = factorize_kv(wk, wv, full_latent_dim(12, 16, 40, mode), mode, gram=x.T @ x / len(x))
    assert (torch.einsum("jnc,cd->jnd", low.up_key, low.down) - wk).abs().max() < 1e-4
    assert (torch.einsum("jvc,cd->jvd", low.up_value, low.down) - wv).abs().max() < 1e-4


def test_activation_aware_beats_weight_only_on_the_activations():
    g = torch.Generator().manual_seed(2)
    wk, wv = torch.randn(2, 6, 40, generator=g), torch.randn(2, 8, 40, generator=g)
    x = _activations()
    w = torch.cat([wk.reshape(-1, 40), wv.reshape(-1, 40)])

    def output_error(low):
        rec = torch.cat([low.up_key.reshape(-1, 8), low.up_value.reshape(-1, 8)]) @ low.down
        return ((w - rec) @ x.T).norm().item()

    plain = output_error(factorize_kv(wk, wv, 8))
    aware = output_error(factorize_kv(wk, wv, 8, gram=(x.T @ x / len(x)).double(), damping=1e-4))
    assert aware < 0.8 * plain, (aware, plain)


@pytest.mark.parametrize("kv_heads", [[0, 0, 1, 1], [1, 0, 0, 1]], ids=["grouped", "any order"])
def test_per_query_head_is_latent_query_and_latent_output(kv_heads):
    """The export-friendly products of the two-form program's one-token branch equal the einsum
    forms (``latent_query``; ``latent_output`` without bias), grouped or through a gather."""
    g = torch.Generator().manual_seed(0)
    q, up_key = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 8, 5, generator=g)
    out_latent, up_value = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    kv = torch.tensor(kv_heads)
    grouped = in_repeat_kv_order(kv_heads, 2)
    assert grouped == (kv_heads == [0, 0, 1, 1])
    torch.testing.assert_close(per_query_head(q, up_key, kv, grouped), latent_query(q, up_key, kv))
    torch.testing.assert_close(per_query_head(out_latent, up_value.transpose(1, 2), kv, grouped),
                               latent_output(out_latent, up_value, None, kv))
