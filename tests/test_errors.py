"""Bad input gets a clear error and leaves the source model untouched."""
import pytest
import torch
from helpers import tiny_llama

import mla_pass
from mla_pass import MLAConfig


class NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 32))

    def forward(self, input_ids):
        return self.mlp(self.emb(input_ids))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_model_without_attention():
    with pytest.raises(mla_pass.NoAttentionError, match="no attention"):
        mla_pass.convert(NoAttention())


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_kv=0), "d_kv must be a positive integer"),
    (dict(d_kv=-3), "d_kv must be a positive integer"),
    (dict(rope_freqs=-1), "rope_freqs must be a non-negative integer"),
    (dict(rope_strategy="fastest"), "rope_strategy must be one of"),
    (dict(svd="qr"), "svd must be one of"),
])
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLAConfig(**kwargs)


def test_d_kv_above_full_rank(model):
    before = _state(model)
    # 2 kv heads, head dim 16, hidden 64: full joint rank is min(2*(16-2r)+2*16, 64) = 64 → d_kv ≤ 32
    with pytest.raises(ValueError, match="above the full rank"):
        mla_pass.convert(model, MLAConfig(d_kv=33))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rope_freqs_above_what_model_rotates(model):
    with pytest.raises(ValueError, match="rotary frequency pairs"):
        mla_pass.convert(model, MLAConfig(rope_freqs=9))   # head dim 16 → 8 pairs


def test_two_norm_needs_calibration(model):
    with pytest.raises(ValueError, match="calibration"):
        mla_pass.convert(model, MLAConfig(rope_freqs=2, rope_strategy="2-norm"))


def test_activation_aware_needs_calibration(model):
    with pytest.raises(ValueError, match="activation_aware=True needs real activations"):
        mla_pass.convert(model, MLAConfig(d_kv=8, activation_aware=True))


def test_calibration_ids_beyond_vocabulary(model):
    with pytest.raises(ValueError, match="below the vocabulary size 128"):
        mla_pass.convert(model, MLAConfig(d_kv=8, activation_aware=True), calibration=torch.full((2, 8), 500))


def test_bad_calibration_tokens(model):
    with pytest.raises(ValueError, match="calibration must be"):
        mla_pass.convert(model, MLAConfig(rope_freqs=2, rope_strategy="2-norm"), calibration=torch.rand(4, 8))


def test_already_converted(model):
    mla = mla_pass.convert(model)
    with pytest.raises(ValueError, match="already converted"):
        mla_pass.convert(mla)


def test_bad_inputs_to_converted_model(model):
    mla = mla_pass.convert(model, MLAConfig(d_kv=4, rope_freqs=2))
    with pytest.raises(ValueError, match="empty"):
        mla(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        mla(torch.tensor([[1, 500]]))
    cache = mla.empty_cache(1)
    cache[0] = torch.zeros(1, 0, 7)
    with pytest.raises(ValueError, match="past_key_values.0.latent has shape"):
        mla.step_with_cache(torch.tensor([[1, 2]]), torch.ones(1, 2), cache)
    with pytest.raises(ValueError, match="attention_mask must be"):
        mla.step_with_cache(torch.tensor([[1, 2]]), torch.ones(1, 3), mla.empty_cache(1))


class TanhKey(torch.nn.Module):
    """A decoder whose key passes through tanh: not affine, so not exactly factorisable."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids, position_ids=None):
        x = self.emb(input_ids)
        b, s, _ = x.shape
        split = lambda t: t.view(b, s, 2, 8).transpose(1, 2)  # noqa: E731
        att = torch.nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(torch.tanh(self.k(x))), split(self.v(x)), is_causal=True)
        return self.head(x + self.o(att.transpose(1, 2).reshape(b, s, 16)))


def test_unsupported_site_named_and_best_effort():
    """A non-affine op on k's path is refused naming the layer, the node and the reason, or
    left untouched with best_effort (and then generate recomputes instead of caching)."""
    torch.manual_seed(0)
    model = TanhKey().eval()
    with pytest.raises(mla_pass.UnsupportedAttentionError, match=r"attention at .* \(node '.*'\): .*"):
        mla_pass.convert(model)
    with pytest.warns(UserWarning, match="left untouched"):
        mla = mla_pass.convert(model, MLAConfig(best_effort=True))
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        assert torch.allclose(mla(ids), model(ids), atol=1e-6)
    assert all(r.converted_values_per_token is None for r in mla.report)
    # the untouched site still counts its full K/V: 2 kv heads × (8 + 8) values × 2 bytes
    assert mla.kv_cache_bytes_per_token(torch.float16) == 2 * 16 * 2 == mla_pass.kv_cache_bytes_per_token(model)
    assert mla.generate(ids, max_new_tokens=3, eos_token_id=None).shape == (1, 9)
    with pytest.raises(NotImplementedError, match="left untouched"):
        mla.step_with_cache(ids, torch.ones_like(ids), mla.empty_cache(1))
