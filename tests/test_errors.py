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


# -- non-finite numbers are reported as what they are ---------------------------------------------
def test_nan_in_a_source_weight_is_named():
    """A NaN in a layer-0 MLP weight used to get layer 1's attention refused ("reads no single kv head")."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf.*model\.layers\.0\.mlp\.up_proj\.weight \(1 of"):
        mla_pass.convert(model, MLAConfig(d_kv=4, rope_freqs=2), progress=False)


def test_nan_in_a_converted_weight_stops_generate_and_load(model, tmp_path):
    mla = mla_pass.convert(model, MLAConfig(d_kv=4, rope_freqs=2), progress=False)
    with torch.no_grad():
        next(p for n, p in mla.program.named_parameters() if n.endswith("down")).fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="NaN or inf logits at generated token 0"):
        mla.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    mla.save(tmp_path / "m")
    with pytest.raises(mla_pass.CheckpointError, match=r"holds NaN or inf in mla\.0\.down"):
        mla_pass.load(tmp_path / "m")


# -- exports: validated first, written whole or not at all ----------------------------------------
onnx_export = pytest.importorskip("mla_pass.export.onnx", reason="the ONNX exporter needs onnx and onnxscript")


@pytest.mark.parametrize("max_length", [-5, 0, 1, 2.5, True])
def test_export_max_length_is_checked_first(model, tmp_path, max_length):
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        onnx_export.to_onnx(model, tmp_path / "o", max_length=max_length)
    assert not (tmp_path / "o").exists()


def test_export_into_a_file_or_a_full_folder_is_refused_before_any_work(model, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for dest, what in ((tmp_path / "file", "a file"), (tmp_path / "full", "not empty")):
        with pytest.raises(FileExistsError, match=what):
            onnx_export.to_onnx(model, dest)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_a_failed_export_leaves_no_folder_and_stale_staging_is_removed(model, tmp_path, monkeypatch):
    import mla_pass.export.verify as export_verify

    stale = tmp_path / ".o.staging-999999999"        # left by a killed export (no such process)
    stale.mkdir()
    (stale / "model.onnx").write_text("partial")

    def broken_check(*args, **kwargs):
        raise onnx_export.ExportError("injected failure at the final check")

    monkeypatch.setattr(export_verify, "check_export", broken_check)
    with pytest.raises(onnx_export.ExportError, match="injected"):
        onnx_export.to_onnx(model, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a failed export left files behind"
    monkeypatch.undo()
    folder = onnx_export.to_onnx(model, tmp_path / "o", progress=False)
    assert (folder / "manifest.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_stop_whose_keyboardinterrupt_was_swallowed_still_publishes_nothing(tmp_path, monkeypatch):
    """SIGTERM's KeyboardInterrupt can land in a weakref callback, where Python ignores it: the
    recorded stop is raised again before the folder is published, and the staging copy is removed."""
    from mla_pass.export import staging

    monkeypatch.setattr(staging, "_stop", type(staging._stop)())     # a fresh flag for this test
    with pytest.raises(KeyboardInterrupt):
        with staging.staged_folder(tmp_path / "o") as folder:
            (folder / "model.onnx").write_text("whole")
            staging.request_stop()                 # what the CLI's handler records before it raises
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_during_an_import_is_raised_when_the_import_has_finished(tmp_path, monkeypatch):
    """Raised inside an import, KeyboardInterrupt can reach a C extension's init and abort the
    process (SIGABRT, seen with onnx's pybind11 enums): the CLI's handler lets the import finish."""
    import signal
    import sys
    import time

    from mla_pass.cli import commands
    from mla_pass.export import staging

    monkeypatch.setattr(staging, "_stop", type(staging._stop)())
    (tmp_path / "module_signalled_while_importing.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "for _ in range(30):\n    time.sleep(0.01)\nFINISHED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = signal.signal(signal.SIGTERM, commands._interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            import module_signalled_while_importing  # noqa: F401
            time.sleep(10)                           # the re-sent signal lands here
        assert sys.modules["module_signalled_while_importing"].FINISHED
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.modules.pop("module_signalled_while_importing", None)
