"""save/load: bit-exact round trip; damaged checkpoints are refused with a clear message."""
import json

import pytest
import torch
from helpers import tiny_llama, tiny_qwen2

import mla_pass
from mla_pass.persist import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_qwen2()
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(model, mla_pass.MLAConfig(d_kv=8, rope_freqs=3, rope_strategy="2-norm",
                                                     activation_aware=True), calibration=calibration)
    path = tmp_path_factory.mktemp("ckpt") / "qwen2-mla"
    mla.save(path)
    return mla, path


def test_round_trip_is_bit_exact(saved):
    mla, path = saved
    mla2 = mla_pass.load(path)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(mla(ids), mla2(ids))
    assert torch.equal(mla.generate(ids, max_new_tokens=8), mla2.generate(ids, max_new_tokens=8))
    for (k, a), (k2, b) in zip(sorted(mla.program.state_dict().items()), sorted(mla2.program.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert mla2.kv_cache_bytes_per_token() == mla.kv_cache_bytes_per_token()
    assert mla2.plans == mla.plans


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    mla = mla_pass.convert(model)
    mla.save(tmp_path / "m")
    mla2 = mla_pass.load(tmp_path / "m")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(mla(ids), mla2(ids))


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_weights_are_refused(saved, tmp_path):
    path = _copy(saved[1], tmp_path / "c")
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="checksum"):
        mla_pass.load(path)


def test_edited_weights_are_refused(saved, tmp_path):
    path = _copy(saved[1], tmp_path / "c")
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-7] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or edited"):
        mla_pass.load(path)


def test_edited_config_is_refused(saved, tmp_path):
    path = _copy(saved[1], tmp_path / "c")
    (path / "mla_config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        mla_pass.load(path)
    meta = json.loads((saved[1] / "mla_config.json").read_text())
    meta["plans"][0]["latent_dim"] += 1
    (path / "mla_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit"):
        mla_pass.load(path)


def test_missing_files_are_refused(saved, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder written by"):
        mla_pass.load(tmp_path)
    path = _copy(saved[1], tmp_path / "c")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        mla_pass.load(path)


def test_save_never_overwrites_a_source_model_folder(tmp_path):
    """Saving into the Hugging Face folder the model came from (``mla-pass convert DIR --out DIR``)
    would replace its model.safetensors: refused, and the folder is left as it was."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    before = {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()}
    mla = mla_pass.convert(model, mla_pass.MLAConfig(d_kv=4, rope_freqs=2), progress=False)
    with pytest.raises(CheckpointError, match="would overwrite its weights"):
        mla.save(tmp_path / "hf")
    assert {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()} == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        mla.save(tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds other files"):
        mla.save(tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]
    mla.save(tmp_path / "mla")
    mla.save(tmp_path / "mla")                     # a previous save is replaced
    assert mla_pass.load(tmp_path / "mla") is not None


_KILLED_SAVE = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
from helpers import tiny_llama
import mla_pass, mla_pass.persist as persist
import safetensors.torch

point = {point!r}
def die():
    os.kill(os.getpid(), signal.SIGKILL)
real_save, real_replace, real_fsync = safetensors.torch.save_file, os.replace, persist._fsync
replaced = []
def save_file(*a, **k):
    real_save(*a, **k)
    if point == "weights written":
        die()
def fsync(p):
    real_fsync(p)
    if point == "config written" and p.name.endswith(".json.pending"):
        die()
def replace(a, b):
    real_replace(a, b)
    replaced.append(b)
    if point == f"after rename {{len(replaced)}}":
        die()
safetensors.torch.save_file, persist._fsync, persist.os.replace = save_file, fsync, replace
mla = mla_pass.convert(tiny_llama(), mla_pass.MLAConfig(d_kv=4, rope_freqs=2), progress=False)
with torch.no_grad():
    for p in mla.program.parameters():
        p.fill_(0.5)                                  # the new checkpoint: every weight 0.5
mla.save({path!r})
"""


@pytest.mark.parametrize("point,survivor", [("weights written", "old"), ("config written", "old"),
                                            ("after rename 1", "new"), ("after rename 2", "new")])
def test_a_save_killed_at_any_step_leaves_one_whole_checkpoint(tmp_path, point, survivor):
    """SIGKILL at each step of a save over an existing checkpoint: the folder then loads as the old
    checkpoint (killed before the new weights were in place) or the new one (after), never as a
    mix, and no pending file is left once it has been read."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "m"
    old = mla_pass.convert(tiny_llama(), mla_pass.MLAConfig(d_kv=4, rope_freqs=2), progress=False)
    old.save(path)
    code = _KILLED_SAVE.format(tests=str(Path(__file__).parent), point=point, path=str(path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    loaded = mla_pass.load(path)
    params = dict(loaded.program.named_parameters())
    if survivor == "new":
        assert all(bool((p == 0.5).all()) for p in params.values())
    else:
        want = dict(old.program.named_parameters())
        assert all(torch.equal(p, want[n]) for n, p in params.items())
    assert not [f.name for f in path.iterdir() if f.name.endswith(".pending")]


def test_mixed_rope_slots_round_trip_bit_exact(tmp_path):
    """The default with calibration mixes rotary pairs across kv heads: U (``rope_mix``) and the
    query's slot weights are saved, and the loaded model is the same function."""
    model = tiny_llama(n_kv=2)
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(model, mla_pass.MLAConfig(d_kv=6, rope_freqs=2), calibration=calibration, progress=False)
    assert all(p.rope_mixed for p in mla.plans.values())
    mla.save(tmp_path / "m")
    mla2 = mla_pass.load(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(mla(ids), mla2(ids))
    assert mla2.plans == mla.plans
    assert torch.equal(mla2.program.get_submodule("mla.0").rope_mix, mla.program.get_submodule("mla.0").rope_mix)


def test_a_checkpoint_in_the_retired_per_kv_head_layout_is_refused(saved, tmp_path):
    path = _copy(saved[1], tmp_path / "old")
    meta = json.loads((saved[1] / "mla_config.json").read_text())
    for plan in meta["plans"]:          # what an earlier version wrote: rotated dims per kv head
        plan["rope_dims"] = plan.pop("rope_pairs")[:plan["n_kv_heads"]]
        del plan["rope_slots"], plan["rope_mixed"]
    (path / "mla_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="saved by an earlier mla-pass.*convert the source model again"):
        mla_pass.load(path)
