"""Hostile input at every public entry of the Python API: each gets a clear error of ours (type and
message), raised before any work, never an exception from deep inside torch or numpy."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

import mla_pass
from mla_pass import DistillConfig, MLAConfig, RecoveryConfig


@pytest.fixture(scope="module")
def pair():
    model = tiny_llama()
    return model, mla_pass.convert(model, MLAConfig(d_kv=4, rope_freqs=2), progress=False)


def ids(*rows):
    return torch.tensor(rows)


CASES = {
    # entry: (call(model, mla, tmp_path), exception, message)
    "convert: config not an MLAConfig": (lambda m, a, p: mla_pass.convert(m, {"d_kv": 4}), TypeError, "must be an MLAConfig"),
    "convert: not a module": (lambda m, a, p: mla_pass.convert("llama"), ValueError, "expected a torch.nn.Module"),
    "convert: converted model": (lambda m, a, p: mla_pass.convert(a), ValueError, "already converted"),
    "convert: float calibration": (lambda m, a, p: mla_pass.convert(m, MLAConfig(d_kv=4, rope_freqs=2),
                                   calibration=torch.rand(2, 8)), ValueError, "token ids shaped"),
    "convert: empty calibration": (lambda m, a, p: mla_pass.convert(m, MLAConfig(d_kv=4, rope_freqs=2),
                                   calibration=torch.zeros(0, 8, dtype=torch.long)), ValueError, "non-empty"),
    "convert: negative calibration ids": (lambda m, a, p: mla_pass.convert(m, MLAConfig(d_kv=4, rope_freqs=2),
                                          calibration=torch.full((2, 8), -1)), ValueError, ">= 0"),
    "convert: calibration ids past the vocabulary": (lambda m, a, p: mla_pass.convert(
        m, MLAConfig(d_kv=4, rope_freqs=2), calibration=torch.full((2, 8), 128)), ValueError, "below the vocabulary"),
    "MLAConfig: d_kv < 1": (lambda m, a, p: MLAConfig(d_kv=-1), ValueError, "d_kv must be a positive integer"),
    "MLAConfig: fractional rope_freqs": (lambda m, a, p: MLAConfig(rope_freqs=1.5), ValueError, "rope_freqs must be"),
    "MLAConfig: kv_budget > 1": (lambda m, a, p: MLAConfig(kv_budget=2.0), ValueError, r"in \(0, 1\]"),
    "MLAConfig: unknown svd": (lambda m, a, p: MLAConfig(svd="bad"), ValueError, "svd must be one of"),
    "forward: float ids": (lambda m, a, p: a(torch.rand(1, 4)), ValueError, "integer tensor"),
    "forward: 1-d ids": (lambda m, a, p: a(torch.tensor([1, 2])), ValueError, "integer tensor"),
    "forward: ids past the vocabulary": (lambda m, a, p: a(ids([128])), ValueError, r"in \[0, 128\)"),
    "forward: empty batch": (lambda m, a, p: a(torch.zeros(0, 4, dtype=torch.long)), ValueError, "is empty"),
    "forward: mask of another shape": (lambda m, a, p: a(ids([1, 2, 3]), attention_mask=torch.ones(1, 2)),
                                       ValueError, "attention_mask must be"),
    "generate: negative max_new_tokens": (lambda m, a, p: a.generate(ids([1, 2]), max_new_tokens=-1), ValueError,
                                          "max_new_tokens must be an integer >= 0"),
    "generate: fractional max_new_tokens": (lambda m, a, p: a.generate(ids([1, 2]), max_new_tokens=1.5), ValueError,
                                            "max_new_tokens must be an integer >= 0"),
    "generate: eos not a token id": (lambda m, a, p: a.generate(ids([1, 2]), max_new_tokens=2, eos_token_id="x"),
                                     ValueError, "eos_token_id must be token ids"),
    "generate: pad past the vocabulary": (lambda m, a, p: a.generate(ids([1, 2]), max_new_tokens=2, pad_token_id=128),
                                          ValueError, "pad_token_id must be token ids"),
    "generate: mask of another shape": (lambda m, a, p: a.generate(ids([1, 2]), 2, attention_mask=torch.ones(1, 3)),
                                        ValueError, "shaped like input_ids"),
    "generate: a row without a real token": (lambda m, a, p: a.generate(ids([1, 2]), 2, attention_mask=torch.zeros(1, 2)),
                                             ValueError, "at least one real token"),
    "set_form: unknown form": (lambda m, a, p: a.set_form("fast"), ValueError, "form must be one of"),
    "load: no such folder": (lambda m, a, p: mla_pass.load(p / "nothing"), mla_pass.CheckpointError, "is not a folder"),
    "load: a file": (lambda m, a, p: mla_pass.load(__file__), mla_pass.CheckpointError, "is not a folder"),
    "load: a folder of something else": (lambda m, a, p: mla_pass.load(p), mla_pass.CheckpointError, "is missing"),
    "save: into a file": (lambda m, a, p: (p / "f").write_text("x") and a.save(p / "f"), mla_pass.CheckpointError,
                          "is a file"),
    "recover: float tokens": (lambda m, a, p: mla_pass.recover(a, m, torch.rand(2, 8), RecoveryConfig(steps=1)),
                              ValueError, "token ids shaped"),
    "recover: ids past the vocabulary": (lambda m, a, p: mla_pass.recover(a, m, torch.full((2, 8), 128),
                                         RecoveryConfig(steps=1)), ValueError, "below the vocabulary"),
    "recover: an unconverted model": (lambda m, a, p: mla_pass.recover(m, m, ids([1, 2, 3])), TypeError,
                                      "needs a converted model"),
    "RecoveryConfig: negative steps": (lambda m, a, p: RecoveryConfig(steps=-1), ValueError, "steps must be >= 0"),
    "distill: 1-d tokens": (lambda m, a, p: mla_pass.distill(a, m, torch.tensor([1, 2, 3]), DistillConfig(steps=1)),
                            ValueError, "token windows"),
    "DistillConfig: negative lr": (lambda m, a, p: DistillConfig(lr=-1.0), ValueError, "lr must be > 0"),
    "DistillConfig: batch 0": (lambda m, a, p: DistillConfig(batch_size=0), ValueError, "batch_size must be >= 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_gets_a_clear_error(pair, tmp_path, case):
    call, error, message = CASES[case]
    model, mla = pair
    with pytest.raises(error, match=message) as caught:
        call(model, mla, tmp_path)
    import traceback
    where = traceback.extract_tb(caught.value.__traceback__)[-1].filename
    package = str(Path(mla_pass.__file__).parent)
    assert where.startswith(package), f"{case}: raised from {where}, not by mla_pass itself"
