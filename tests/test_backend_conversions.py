"""``torch.compile(backend="mla")`` running real conversions: ``options={"checkpoint": DIR}`` (a
conversion saved by ``mla.save`` / ``mla-pass convert`` / ``recover``, trained weights included) and
``options={"calibration": ids}`` (the calibrated conversion ``convert`` makes). References:
``mla_pass.load(DIR)`` and ``mla_pass.convert(model, config, calibration=ids)``, eager inner."""
from __future__ import annotations

import os

import pytest
import torch

import mla_pass
from mla_pass import MLAConfig

torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))
transformers = pytest.importorskip("transformers")
from test_backend import FAMS, cache_bytes, fresh_dynamo, max_diff, prompt  # noqa: E402, F401  (autouse)
from test_backend import compiled as compiled_with  # noqa: E402
from test_families import build_hf  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

TOL = 1e-4
CONFIG = MLAConfig(d_kv=4, rope_freqs=2)        # calibrated: score-error pairs, activation-aware SVD


def compiled(model, options):
    return compiled_with(model, {"inner": "eager", **options})


def calibration_ids():
    return torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A calibrated conversion of a tiny GQA Llama whose latent weights were then changed (as a
    recovery would), saved; and the model it came from."""
    model = build_hf(FAMS["llama-gqa"])
    mla = mla_pass.convert(model, CONFIG, calibration=calibration_ids(), progress=False)
    with torch.no_grad():
        for name, p in mla.program.named_parameters():
            if name.startswith("mla."):
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    path = tmp_path_factory.mktemp("ckpt") / "llama-mla"
    mla.save(path)
    return model, path


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "phi3"])
def test_checkpoint_logits_equal_load(name, tmp_path):
    model = build_hf(FAMS[name])
    mla_pass.convert(model, CONFIG, calibration=calibration_ids(), progress=False).save(tmp_path / "m")
    want = mla_pass.load(tmp_path / "m")(prompt((2, 6)))
    with torch.no_grad():
        got = compiled(model, {"checkpoint": tmp_path / "m"})(prompt((2, 6))).logits
    d = max_diff(got, want)
    assert d <= TOL, f"{name}: compiled checkpoint vs load max |diff| = {d:.2e} > {TOL:.0e}"
    assert counters["mla"]["sites_rewritten"] == 2 and counters["mla"]["factorisations"] == 0


def test_checkpoint_keeps_trained_weights_and_its_cache_layout(saved):
    model, path = saved
    mla = mla_pass.load(path)
    ids = prompt((1, 5), seed=4)
    want_tokens = mla.generate(ids, max_new_tokens=8, eos_token_id=None)
    copy_ = compiled(model, {"checkpoint": str(path)})
    with torch.no_grad():
        d = max_diff(copy_(ids).logits, mla(ids))
        out = copy_.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=0)
    assert d <= TOL, f"trained checkpoint: compiled vs load max |diff| = {d:.2e}"
    assert torch.equal(out.sequences, want_tokens), "compiled generation differs from mla.generate"
    total = out.sequences.shape[1] - 1                               # tokens cached after the last step
    assert cache_bytes(out.past_key_values) == mla.kv_cache_bytes_per_token(torch.float32) * total


def test_calibration_option_equals_convert():
    model = build_hf(FAMS["llama-gqa"])
    ids = calibration_ids()
    want = mla_pass.convert(model, CONFIG, calibration=ids, progress=False)(prompt((2, 6)))
    options = {"d_kv": 4, "rope_freqs": 2, "calibration": ids}
    uncalibrated = {"d_kv": 4, "rope_freqs": 2}
    with torch.no_grad():
        got = compiled(model, options)(prompt((2, 6))).logits
        weight_only = compiled(model, uncalibrated)(prompt((2, 6))).logits
    d = max_diff(got, want)
    assert d <= TOL, f"calibrated compile vs convert max |diff| = {d:.2e} > {TOL:.0e}"
    assert max_diff(weight_only, want) > 100 * TOL, "the calibration option changed nothing"


def test_checkpoint_of_another_model_is_a_clear_error(saved):
    _, path = saved
    other = build_hf(FAMS["llama-gqa"], seed=1)          # same architecture, other weights
    with pytest.raises(Exception, match="another model"):
        compiled(other, {"checkpoint": path})(prompt((2, 6)))
    shaped = build_hf(FAMS["qwen2"])                      # other shapes: no plan fits
    with pytest.raises(Exception, match="another model"):
        compiled(shaped, {"checkpoint": path})(prompt((2, 6)))


def test_checkpoint_option_errors(saved, tmp_path):
    from mla_pass.dynamo.backend import parse_options

    _, path = saved
    with pytest.raises(ValueError, match="do not go together"):
        parse_options({"checkpoint": path, "d_kv": 8})
    with pytest.raises(ValueError, match="not a folder written by"):
        parse_options({"checkpoint": tmp_path})
    with pytest.raises(ValueError, match="calibration"):
        parse_options({"d_kv": 8, "rope_freqs": 4, "rope_strategy": "2-norm"})
    opts = parse_options({"d_kv": 8, "rope_freqs": 4, "rope_strategy": "2-norm", "calibration": calibration_ids()})
    assert opts.resolved.rope_strategy == "2-norm" and opts.resolved.activation_aware


@pytest.mark.slow
def test_smollm2_calibrated_checkpoint_through_compile(smollm2, tmp_path):
    """SmolLM2-135M converted with calibration (the project default at d_kv=8), saved, compiled from
    the checkpoint: KL to the original on held-out text equals mla_pass.load's."""
    from mla_pass.quality import calibration_windows, held_out_windows, text_quality

    model, tok = smollm2
    mla = mla_pass.convert(model, MLAConfig(d_kv=8, rope_freqs=4), calibration=calibration_windows(tok, 2, 256),
                           progress=False)
    mla.save(tmp_path / "smollm2-mla")
    loaded = mla_pass.load(tmp_path / "smollm2-mla")
    windows = held_out_windows(tok, 1, 256)
    fast = compiled(model, {"checkpoint": tmp_path / "smollm2-mla"})
    want = text_quality(loaded, windows, model, progress=False)
    with torch.no_grad():
        got = text_quality(fast, windows, model, progress=False)
    assert abs(got.kl - want.kl) <= 1e-3 * max(1.0, want.kl), f"KL compiled {got.kl:.5f} vs load {want.kl:.5f}"
    assert counters["mla"]["sites_rewritten"] == 30
