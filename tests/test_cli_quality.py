"""`mla-pass eval` and `mla-pass recover` on a tiny Hugging Face folder with a real (byte-level) tokenizer."""
import json
import os

import pytest
import torch
from helpers import byte_tokenizer

from mla_pass.cli import main

torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny HF folder (model + tokenizer) and its conversion saved by `mla-pass convert`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mla_pass import assets
    try:
        for name in assets.TEXTS:
            assets.text_path(name)
    except assets.AssetError as e:
        pytest.skip(f"text could not be fetched: {e}")
    root = tmp_path_factory.mktemp("quality")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    with torch.no_grad():     # weights large enough that the model is far from uniform: a rank-2
        for p in model.parameters():        # latent then visibly changes its predictions
            if p.dim() > 1:
                p.normal_(0, 0.3)
    hf = root / "tiny"
    model.save_pretrained(str(hf))
    byte_tokenizer().save_pretrained(str(hf))
    mla = root / "mla"
    assert main(["convert", str(hf), "--out", str(mla), "--d-kv", "2", "--rope-freqs", "1"]) == 0
    return hf, mla


def test_eval_converted_folder_compares_with_its_original(folders, capsys):
    hf, mla = folders
    capsys.readouterr()
    assert main(["eval", str(mla), "--windows", "2", "--length", "64"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "original" in rows and "converted" in rows, out
    original_kl = rows["original"].split("|")[5].strip()
    converted_kl = float(rows["converted"].split("|")[5])
    assert original_kl == "0.000" and converted_kl > 0


def test_eval_with_passkey(folders, capsys):
    hf, _ = folders
    capsys.readouterr()
    assert main(["eval", str(hf), "--windows", "1", "--length", "32", "--passkey"]) == 0
    out = capsys.readouterr().out
    assert "passkey 1k" in out and "passkey 2k" in out and "| model |" in out


def _tensors(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_recover_is_deterministic_and_resumes_to_the_same_result(folders, tmp_path, capsys):
    _, mla = folders
    common = ["--steps", "30", "--windows", "2", "--length", "32", "--seed", "3", "--distill-steps", "0"]
    assert main(["recover", str(mla), "--out", str(tmp_path / "a"), *common]) == 0
    assert "recovered 3 sites" in capsys.readouterr().out
    # the same run, cut after the first site by a zero time limit, then resumed
    assert main(["recover", str(mla), "--out", str(tmp_path / "b"), *common, "--minutes", "0"]) == 0
    assert "after 1/3 sites" in capsys.readouterr().out
    state = json.loads((tmp_path / "b" / "recovery.json").read_text())
    assert state["done"] == [0] and not state["complete"]
    assert (tmp_path / "b" / "recovery.safetensors").is_file()
    assert main(["recover", str(mla), "--out", str(tmp_path / "b"), *common, "--resume"]) == 0
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from mla_pass.rewrite import MODULES
    before = _tensors(mla)
    latent = [k for k in a if k.startswith(MODULES + ".")]
    assert latent and any(not torch.equal(before[k], a[k]) for k in latent), "recovery changed nothing"
    assert all(torch.equal(before[k], a[k]) for k in a if k not in latent), "recovery moved non-attention weights"


def test_recover_errors(folders, tmp_path, capsys):
    hf, mla = folders
    with pytest.raises(SystemExit, match="not a converted model"):
        main(["recover", str(hf), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--resume.*does not exist"):
        main(["recover", str(mla), "--out", str(tmp_path / "x"), "--resume"])
    assert main(["recover", str(mla), "--out", str(tmp_path / "x"), "--windows", "100000", "--length", "512"]) == 2
    assert "alice29.txt has" in capsys.readouterr().err and not (tmp_path / "x").exists()
    common = ["--steps", "2", "--windows", "1", "--length", "16", "--minutes", "0", "--distill-steps", "0"]
    assert main(["recover", str(mla), "--out", str(tmp_path / "y"), *common]) == 0
    with pytest.raises(SystemExit, match="already holds a recovery checkpoint"):
        main(["recover", str(mla), "--out", str(tmp_path / "y"), *common])
    with pytest.raises(SystemExit, match="made with"):
        main(["recover", str(mla), "--out", str(tmp_path / "y"), "--steps", "3", "--windows", "1", "--length", "16",
              "--resume"])


def test_recover_with_distillation_resumes_to_the_same_result(folders, tmp_path, capsys):
    _, mla = folders
    common = ["--steps", "0", "--distill-steps", "3", "--distill-windows", "4", "--distill-length", "64",
              "--windows", "1", "--length", "32"]
    assert main(["recover", str(mla), "--out", str(tmp_path / "a"), *common]) == 0
    assert "distillation: 3 steps on 384 training tokens" in capsys.readouterr().out
    assert main(["recover", str(mla), "--out", str(tmp_path / "b"), *common, "--minutes", "0"]) == 0
    assert "after 1/3 distillation steps" in capsys.readouterr().out
    assert (tmp_path / "b" / "distill.safetensors").is_file()
    for _ in range(2):
        assert main(["recover", str(mla), "--out", str(tmp_path / "b"), *common, "--minutes", "0", "--resume"]) == 0
    assert "recovered 3 sites" in capsys.readouterr().out
    assert not (tmp_path / "b" / "distill.safetensors").exists()
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="must be >= 0"):
        main(["recover", str(mla), "--out", str(tmp_path / "c"), "--distill-steps", "-1"])
    assert main(["recover", str(mla), "--out", str(tmp_path / "c"), *common[:2], "--distill-windows", "100000"]) == 2
    assert "windows of 512 tokens" in capsys.readouterr().err


def test_recover_distils_on_generated_text(folders, tmp_path, capsys):
    """--distill-text mix: the original's samples (cached under --cache-dir) interleaved with the books."""
    from mla_pass import assets
    _, mla = folders
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "text").symlink_to(assets.text_path("alice29.txt").parent, target_is_directory=True)
    args = ["--cache-dir", str(cache), "recover", str(mla), "--steps", "2", "--windows", "2", "--length", "32",
            "--distill-steps", "2", "--distill-windows", "2", "--distill-length", "160", "--distill-text", "mix",
            "--generated-tokens", "320"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "generation: 2 windows" in out and "distillation on mix text: 2 steps" in out
    assert len(list((cache / "selfgen").glob("*.safetensors"))) == 1
    assert main([*args, "--out", str(tmp_path / "b")]) == 0          # the samples come from the cache
    assert "(cached)" in capsys.readouterr().out


def test_recover_on_two_processes_matches_one(folders, tmp_path, capsys):
    """`--nproc 2`: sites shared out in rounds, distillation batches split; the same model as one process
    (layer-wise fits are the same arithmetic; the averaged gradients differ by float32 rounding)."""
    _, mla = folders
    common = ["--steps", "3", "--distill-steps", "3", "--distill-batch", "2", "--distill-windows", "4",
              "--distill-length", "64", "--windows", "1", "--length", "32", "--autocast", "none"]
    assert main(["recover", str(mla), "--out", str(tmp_path / "one"), *common]) == 0
    assert main(["recover", str(mla), "--out", str(tmp_path / "two"), *common, "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "recovering on 2 processes" in out
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    with pytest.raises(SystemExit, match="multiple of 2"):
        main(["recover", str(mla), "--out", str(tmp_path / "x"), "--distill-batch", "3", "--nproc", "2"])
    with pytest.raises(SystemExit, match="--sequential"):
        main(["recover", str(mla), "--out", str(tmp_path / "x"), "--sequential", "--nproc", "2"])
    with pytest.raises(SystemExit, match=r"recovery process \d of 2 stopped \(exit code 1\).*--resume"):
        main(["recover", str(mla), "--out", str(tmp_path / "x"), *common, "--nproc", "2",
              "--original", str(tmp_path / "missing")])


def test_recover_killed_mid_layer_wise_resumes_to_the_same_result(folders, tmp_path):
    """SIGKILL after the first site's checkpoint (no handler runs): the checkpoint pair is whole
    and `--resume` ends with the weights of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    _, mla = folders
    common = ["--steps", "600", "--windows", "2", "--length", "32", "--distill-steps", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def recover(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "mla_pass.cli", "recover", str(mla), "--out", str(out),
                                 *common, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    whole = recover(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-2000:]
    proc, state = recover(tmp_path / "cut"), tmp_path / "cut" / "recovery.json"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not state.is_file():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = json.loads(state.read_text())["done"]
    assert 1 <= len(done) < 3, done
    again = recover(tmp_path / "cut", "--resume")
    assert again.wait(timeout=600) == 0, again.stderr.read()[-2000:]
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
