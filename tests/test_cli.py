"""The CLI on a tiny Hugging Face folder: inspect, convert (saves), inspect the saved folder."""
import pytest
from helpers import tiny_llama

from mla_pass.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_llama().save_pretrained(str(path))
    return path


def test_inspect_hf_folder(hf_dir, capsys):
    assert main(["inspect", str(hf_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("self_attn") == 2
    assert "2 attention sites; original KV cache 256 bytes/token in fp16" in out


def test_convert_then_inspect_saved(hf_dir, tmp_path, capsys):
    out_dir = tmp_path / "mla"
    assert main(["convert", str(hf_dir), "--out", str(out_dir), "--d-kv", "4", "--rope-freqs", "2"]) == 0
    printed = capsys.readouterr().out
    # per layer: 2 kv heads × 4 latent + 2 kv heads × 4 rope dims = 16 values → 2 layers × 16 × 2 bytes
    assert "KV cache 256 → 64 bytes/token in fp16 (75.00% smaller)" in printed
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "mla_config.json").is_file()
    assert main(["inspect", str(out_dir)]) == 0
    assert "converted cache 64 bytes/token (75.00% smaller)" in capsys.readouterr().out


def test_bad_model_path(tmp_path, capsys):
    with pytest.raises(SystemExit, match="neither"):
        main(["inspect", str(tmp_path / "nowhere")])


def test_bad_rank_is_a_clean_error(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), "--out", str(tmp_path / "x"), "--d-kv", "999"]) == 2
    assert "above the full rank" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_converted_and_original(hf_dir, tmp_path, capsys):
    from mla_pass.runtime.manifest import Manifest
    assert main(["export", str(hf_dir), "--out", str(tmp_path / "mla"), "--d-kv", "4", "--rope-freqs", "2"]) == 0
    assert "128 KV bytes/token (float32), cache in_place" in capsys.readouterr().out
    assert Manifest.read(tmp_path / "mla").mla_config["d_kv"] == 4
    assert main(["export", str(hf_dir), "--out", str(tmp_path / "orig"), "--original", "--cache-update", "concat"]) == 0
    manifest = Manifest.read(tmp_path / "orig")
    assert manifest.kind == "original" and manifest.cache_update == "concat"
    assert manifest.kv_cache_bytes_per_token() == 512          # 2 layers × 2 kv heads × (16 + 16) × 4 bytes


def test_errors_are_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    """A user error is one line on stderr with a non-zero exit, an unexpected one too (with its
    type); Ctrl-C is one line and exit 130; --debug lets the exception through."""
    import mla_pass.cli.commands as cli_main

    for error, code, line in ((ValueError("d_kv must be positive"), 2, "error: d_kv must be positive"),
                              (OSError("disk full"), 1, "error: OSError: disk full (run with --debug for the traceback)"),
                              (KeyboardInterrupt(), 130, "interrupted")):
        def failing(args, error=error):
            raise error

        monkeypatch.setattr(cli_main, "cmd_inspect", failing)
        assert main(["inspect", "smollm2-135m"]) == code
        assert capsys.readouterr().err.strip() == line
        with pytest.raises(type(error)):
            main(["--debug", "inspect", "smollm2-135m"])


def test_convert_refuses_to_write_over_its_source_before_converting(tmp_path, capsys):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    before = {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()}
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "hf")]) == 2
    assert "would overwrite its weights" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()} == before
    (tmp_path / "file").write_text("x")
    assert main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "o"), "--max-length", "-5"]) == 2
    assert "--max-length must be >= 2" in capsys.readouterr().err


def test_sigterm_during_export_leaves_nothing_behind(tmp_path):
    """SIGTERM (as Ctrl-C) while an export writes its staging folder: one line, exit 130, and
    neither the folder nor its staging copy is left."""
    import signal
    import subprocess
    import sys
    import time

    tiny_llama().save_pretrained(tmp_path / "hf")
    out = tmp_path / "onnx"
    proc = subprocess.Popen([sys.executable, "-m", "mla_pass.cli", "export", str(tmp_path / "hf"), "--out", str(out),
                             "--d-kv", "4", "--rope-freqs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".onnx.staging-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("argv,message", [
    (["convert", "{hf}", "--out", "{out}", "--d-kv", "0"], "d_kv must be a positive integer"),
    (["convert", "{hf}", "--out", "{out}", "--rope-freqs", "-1"], "rope_freqs must be a non-negative integer"),
    (["convert", "{hf}", "--out", "{out}", "--kv-budget", "2"], r"kv_budget is the fraction .* in \(0, 1\]"),
    (["export", "{hf}", "--out", "{out}", "--d-kv", "0"], "d_kv must be a positive integer"),
    (["export", "{hf}", "--out", "{out}", "--max-length", "0"], "--max-length must be >= 2"),
    (["demo", "--tokens", "0"], "--tokens must be >= 2"),
    (["demo", "--recover-minutes", "-1"], "--recover-minutes must be >= 0"),
    (["generate", "{out}", "--prompt", "x"], "is not a folder"),
    (["generate", "{out}", "--prompt", "x", "--top-p", "2"], r"--top-p must be in \(0, 1\], got 2.0"),
    (["generate", "{out}", "--prompt", "x", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["generate", "{out}", "--prompt", "x", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["generate", "{out}", "--prompt", "x", "--prefill-chunk", "0"], "--prefill-chunk must be >= 1, got 0"),
    (["generate", "{out}", "--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", "{out}", "--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "{out}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["eval", "{hf}", "--windows", "0"], "--windows must be >= 1"),
    (["eval", "{hf}", "--length", "1"], "--length must be >= 2"),
    (["recover", "{hf}", "--out", "{out}", "--nproc", "0"], "--nproc must be >= 1"),
    (["recover", "{hf}", "--out", "{out}", "--minutes", "-2"], "--minutes must be >= 0"),
    (["recover", "{hf}", "--out", "{out}", "--distill-lr", "0"], "--distill-lr must be > 0"),
    (["recover", "{hf}", "--out", "{out}", "--temperature", "0"], "--temperature must be > 0"),
    (["recover", "{hf}", "--out", "{out}", "--distill-batch", "0"], "--distill-batch must be >= 1"),
    (["recover", "{hf}", "--out", "{out}", "--distill-length", "1"], "--distill-length must be >= 2"),
    (["recover", "{hf}", "--out", "{out}", "--windows", "0"], "--windows must be >= 1"),
])
def test_bad_options_are_one_line_before_any_work(tmp_path, capsys, argv, message):
    """Every option is checked before the model is loaded or converted: one line, exit 2, nothing
    written (the tiny model's folder is only read after the checks)."""
    import re

    hf, out = tmp_path / "hf", tmp_path / "out"
    tiny_llama().save_pretrained(hf)
    capsys.readouterr()                                   # save_pretrained's own progress lines
    assert main([a.format(hf=hf, out=out) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not out.exists()
