"""Data-parallel distillation on 2 processes (torchrun, gloo): the same losses and weights as one
process, checkpoints that resume at another world size, and a lost rank that ends the run."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_worker import setup, trained
from safetensors.torch import load_file

import mla_pass

WORKER = Path(__file__).with_name("distributed_worker.py")
# two processes sum the same gradients in another order (gloo's all-reduce): float32 rounding only
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-5
RUN_TIMEOUT_S = 240


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def one_process():
    """The reference: the same run in this process (no process group), per objective."""
    runs = {}
    for objective in ("kl", "ce"):
        model, mla, tokens, config = setup(objective)
        report = mla_pass.distill(mla, model, tokens, config, progress=False)
        runs[objective] = (report.losses, trained(mla))
    return runs


def _same_weights(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("parallel,objective", [("ddp", "kl"), ("fsdp", "kl"), ("ddp", "ce")])
def test_two_processes_reproduce_one(one_process, tmp_path, parallel, objective):
    run = _torchrun(tmp_path, "--parallel", parallel, "--objective", objective)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    losses, weights = one_process[objective]
    assert report["processes"] == 2 and report["tokens"] == 8 * 4 * 24
    assert torch.allclose(torch.tensor(report["losses"]), torch.tensor(losses), rtol=LOSS_RTOL, atol=0)
    assert _same_weights(load_file(str(tmp_path / "weights.safetensors")), weights) < WEIGHT_ATOL


def test_a_lost_rank_stops_the_run_and_its_checkpoint_resumes_in_one_process(one_process, tmp_path):
    t0 = time.monotonic()
    run = _torchrun(tmp_path, "--die-at", "5")
    seconds = time.monotonic() - t0
    assert run.returncode != 0 and seconds < RUN_TIMEOUT_S
    assert "SIGKILL" in run.stderr and "rank      : 1" in run.stderr, run.stderr[-3000:]
    state = json.loads((tmp_path / "checkpoint" / "distill.json").read_text())
    assert state["step"] == 4, "the checkpoint of step 4 (every 2 steps) is the last one written"
    assert not (tmp_path / "weights.safetensors").exists()
    model, mla, tokens, config = setup("kl")
    report = mla_pass.distill(mla, model, tokens, config, checkpoint=tmp_path / "checkpoint", progress=False)
    losses, weights = one_process["kl"]
    assert report.steps == 8 and report.processes == 1
    assert torch.allclose(torch.tensor(report.losses), torch.tensor(losses), rtol=LOSS_RTOL, atol=0)
    assert _same_weights(trained(mla), weights) < WEIGHT_ATOL


def test_a_silent_rank_times_out_with_a_clear_error(tmp_path):
    t0 = time.monotonic()
    run = _torchrun(tmp_path, "--hang-at", "3", "--timeout", "10")
    seconds = time.monotonic() - t0
    assert run.returncode != 0 and seconds < RUN_TIMEOUT_S
    assert "RankLostError: rank 0 of 2: a collective failed at step 4" in run.stderr, run.stderr[-3000:]
    assert "resumes it at any process count" in run.stderr
    assert json.loads((tmp_path / "checkpoint" / "distill.json").read_text())["step"] == 2
