"""Layer-by-layer reconstruction: lowers each site's output error, deterministic, never worse."""
import pytest
import torch
from helpers import tiny_llama, tiny_qwen2

import mla_pass
from mla_pass import MLAConfig, RecoveryConfig


def _kl(model, mla, ids):
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)
        return (ref.exp() * (ref - mla(ids).log_softmax(-1))).sum(-1).mean().item()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_reconstruction_lowers_site_error_and_kl(factory):
    model = factory()
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=2), progress=False)
    kl_before = _kl(model, mla, calibration)
    report = mla_pass.recover(mla, model, calibration, RecoveryConfig(steps=60), progress=False)
    assert len(report.sites) == 2
    assert all(s.loss_after <= s.loss_before for s in report.sites)
    assert report.mean("loss_after") < 0.95 * report.mean("loss_before"), report
    assert _kl(model, mla, calibration) < kl_before


def test_reconstruction_is_deterministic():
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    states = []
    for _ in range(2):
        mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=2), progress=False)
        mla_pass.recover(mla, model, calibration, RecoveryConfig(steps=10), progress=False)
        states.append(mla.program.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_key_norm_sites_recover_too():
    import transformers as T
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.Qwen3Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_key_value_heads=2, head_dim=16)).eval()
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    exact = mla_pass.convert(model, progress=False)
    report = mla_pass.recover(exact, model, calibration, RecoveryConfig(steps=2), progress=False)
    assert report.mean("loss_before") < 1e-8          # inputs are replayed correctly: exact stays exact


def test_bad_recovery_arguments():
    with pytest.raises(ValueError, match="unknown trainable"):
        RecoveryConfig(train=("wq",))
    with pytest.raises(ValueError, match="steps"):
        RecoveryConfig(steps=-1)
    model = tiny_llama()
    mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=2), progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        mla_pass.recover(mla, model, torch.full((2, 8), 999), progress=False)
    with pytest.raises(ValueError, match="not in the original model"):
        mla_pass.recover(mla, tiny_llama(layers=1), torch.randint(0, 128, (2, 8)), progress=False)


def test_sequential_reconstruction():
    model = tiny_llama(layers=3)
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=2), progress=False)
    kl_before = _kl(model, mla, calibration)
    report = mla_pass.recover(mla, model, calibration, RecoveryConfig(steps=60, sequential=True), progress=False)
    assert len(report.sites) == 3 and all(s.loss_after <= s.loss_before for s in report.sites)
    assert _kl(model, mla, calibration) < kl_before
