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
    mla.save(tmp_path / "mla")
    mla.save(tmp_path / "mla")                     # a previous save is replaced
    assert mla_pass.load(tmp_path / "mla") is not None
