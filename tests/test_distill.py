"""End-to-end distillation: lowers the KL to the original, resumes to the same weights, clear errors."""
import json

import pytest
import torch
from helpers import tiny_llama

import mla_pass
from mla_pass import DistillConfig, MLAConfig, RecoveryConfig
from mla_pass.quality.distillation import distillation_loss, trainable_parameters


def _kl(model, mla, ids):
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)
        return (ref.exp() * (ref - mla(ids).log_softmax(-1))).sum(-1).mean().item()


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(layers=2)
    with torch.no_grad():          # far from uniform, so a small latent visibly changes the predictions
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return m


_CONVERTED = {}


def _convert(model):
    """A freshly converted model (converted once per model; later calls restore its weights)."""
    if id(model) not in _CONVERTED:
        mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=1), progress=False)
        _CONVERTED[id(model)] = (mla, {k: v.clone() for k, v in mla.program.state_dict().items()})
    mla, start = _CONVERTED[id(model)]
    mla.program.load_state_dict(start)
    return mla


def _tokens(n=8, length=32, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_loss_is_the_kl_and_zero_for_equal_logits():
    t, s = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    p, q = t.log_softmax(-1), s.log_softmax(-1)
    direct = (p.exp() * (p - q)).sum(-1).mean()
    assert torch.allclose(distillation_loss(s, t), direct, atol=1e-6)
    assert distillation_loss(t, t).abs() < 1e-6
    soft = distillation_loss(s, t, temperature=2.0)
    p2, q2 = (t / 2).log_softmax(-1), (s / 2).log_softmax(-1)
    assert torch.allclose(soft, 4 * (p2.exp() * (p2 - q2)).sum(-1).mean(), atol=1e-6)


def test_distillation_lowers_the_kl_and_moves_only_latent_weights(model):
    train, held_out = _tokens(64, 32, 0), _tokens(8, 32, 1)
    mla = _convert(model)
    before = {k: v.clone() for k, v in mla.program.state_dict().items()}
    kl_train, kl_held = _kl(model, mla, train), _kl(model, mla, held_out)
    report = mla_pass.distill(mla, model, train, DistillConfig(steps=40, lr=1e-2, batch_size=8), progress=False)
    assert report.complete and report.steps == 40 and report.tokens == 40 * 8 * 32
    assert _kl(model, mla, train) < 0.9 * kl_train, (kl_train, _kl(model, mla, train))
    assert _kl(model, mla, held_out) < kl_held
    latent = set(trainable_parameters(mla, "latent"))
    after = mla.program.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in latent)
    assert all(torch.equal(before[k], after[k]) for k in after if k not in latent)
    assert all(p.requires_grad for p in mla.program.parameters())        # restored after training


def test_train_all_moves_other_weights(model):
    mla = _convert(model)
    before = {k: v.clone() for k, v in mla.program.state_dict().items()}
    mla_pass.distill(mla, model, _tokens(4, 16), DistillConfig(steps=3, train="all", other_lr=1e-3), progress=False)
    latent = set(trainable_parameters(mla, "latent"))
    after = mla.program.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after if k not in latent)


def test_resumed_equals_uninterrupted(model, tmp_path):
    tokens = _tokens(6, 24)
    config = DistillConfig(steps=9, lr=2e-3, batch_size=4, warmup_steps=2)    # 4 of 6 windows: epochs wrap
    whole = _convert(model)
    full = mla_pass.distill(whole, model, tokens, config, checkpoint=tmp_path / "a", checkpoint_every=4,
                            progress=False)
    a = {k: v.clone() for k, v in whole.program.state_dict().items()}
    parts = None
    for call in range(20):           # fresh weights each time, as in a new process: only the checkpoint carries
        mla = _convert(model)
        parts = mla_pass.distill(mla, model, tokens, config, max_seconds=0, checkpoint=tmp_path / "b",
                                 progress=False)
        if parts.complete:
            break
    assert call == 8 and parts.steps == 9, "a zero time budget stops after one step per call"
    assert parts.losses == full.losses
    b = mla.program.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "b" / "distill.json").read_text())
    assert state["step"] == 9 and state["total_steps"] == 9


def test_time_budget_fixes_the_schedule(model, tmp_path):
    report = mla_pass.distill(_convert(model), model, _tokens(4, 16), DistillConfig(steps=None, warmup_steps=2),
                              max_seconds=2.0, checkpoint=tmp_path, progress=False)
    assert report.total_steps >= 3 and report.steps <= report.total_steps + 1
    assert json.loads((tmp_path / "distill.json").read_text())["total_steps"] == report.total_steps


def test_recover_runs_layer_wise_then_distillation(model):
    mla = _convert(model)
    tokens = _tokens(4, 32)
    kl0 = _kl(model, mla, tokens)
    report = mla_pass.recover(mla, model, tokens, RecoveryConfig(steps=20, distill=DistillConfig(steps=20, lr=3e-3)),
                              distill_tokens=_tokens(8, 32, 5), progress=False)
    assert len(report.sites) == 2 and report.distill is not None and report.distill.steps == 20
    assert _kl(model, mla, tokens) < kl0
    only = mla_pass.recover(_convert(model), model, tokens, RecoveryConfig(steps=0, distill=DistillConfig(steps=2)),
                            progress=False)
    assert only.sites == [] and only.distill.steps == 2


def test_bad_input(model, tmp_path):
    mla = _convert(model)
    with pytest.raises(TypeError, match="converted model"):
        mla_pass.distill(model, model, _tokens())
    with pytest.raises(TypeError, match="original"):
        mla_pass.distill(mla, mla, _tokens())
    with pytest.raises(ValueError, match="L >= 2"):
        mla_pass.distill(mla, model, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary"):
        mla_pass.distill(mla, model, torch.full((2, 8), 999))
    with pytest.raises(ValueError, match="max_seconds"):
        mla_pass.distill(mla, model, _tokens(), DistillConfig(steps=None))
    for bad, match in (({"train": "mlp"}, "train must be one of"), ({"temperature": 0}, "temperature"),
                       ({"steps": 0}, "steps"), ({"lr": 0}, "lr"), ({"grad_clip": 0}, "grad_clip"),
                       ({"autocast": "int8"}, "autocast")):
        with pytest.raises(ValueError, match=match):
            DistillConfig(**bad)
    with pytest.raises(TypeError, match="DistillConfig"):
        RecoveryConfig(distill={"steps": 3})
    mla_pass.distill(mla, model, _tokens(), DistillConfig(steps=2), checkpoint=tmp_path, progress=False)
    with pytest.raises(ValueError, match="made with"):
        mla_pass.distill(mla, model, _tokens(), DistillConfig(steps=3), checkpoint=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other training tokens"):
        mla_pass.distill(mla, model, _tokens(seed=9), DistillConfig(steps=2), checkpoint=tmp_path, progress=False)


def test_a_checkpoint_write_cut_between_its_renames_resumes_exactly(model, tmp_path, monkeypatch):
    """The process dies after the new weights are in place but before the new state is: the next
    run finishes that checkpoint (its journal names the weights' checksum) and resumes from it,
    ending bit-identical to an uninterrupted run (resuming the old state with the new weights
    would not)."""
    import mla_pass.persist as persist

    tokens = _tokens(6, 24)
    config = DistillConfig(steps=9, lr=2e-3, batch_size=4, warmup_steps=2)
    whole = _convert(model)
    mla_pass.distill(whole, model, tokens, config, progress=False)
    want = {k: v.clone() for k, v in whole.program.state_dict().items()}
    real_replace, calls = persist.os.replace, []

    def dies_between_renames(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 3:                        # the second checkpoint (step 8): weights moved, state not
            raise RuntimeError("killed")

    monkeypatch.setattr(persist.os, "replace", dies_between_renames)
    with pytest.raises(RuntimeError, match="killed"):
        mla_pass.distill(_convert(model), model, tokens, config, checkpoint=tmp_path, checkpoint_every=4,
                         progress=False)
    monkeypatch.undo()
    assert (tmp_path / "distill.json.pending").is_file()
    mla = _convert(model)
    report = mla_pass.distill(mla, model, tokens, config, checkpoint=tmp_path, checkpoint_every=4, progress=False)
    assert report.complete and json.loads((tmp_path / "distill.json").read_text())["step"] == 9
    got = mla.program.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
