"""What the CLI's verbs share: loading the model a command names, checking numeric options."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


def load_source(spec: str, cache_dir: str | None):
    """A model from a name (the embedded default), a Hugging Face folder, or a saved mla-pass folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import assets
    from ..persist import CONFIG_FILE

    if spec == DEFAULT_MODEL:
        return assets.load_smollm2(cache_dir)
    path = Path(spec)
    if (path / CONFIG_FILE).is_file():
        from ..pipeline import load
        return load(path), None
    if not (path / "config.json").is_file():
        raise SystemExit(f"error: {spec} is neither '{DEFAULT_MODEL}', a Hugging Face model folder (config.json) "
                         f"nor a folder saved by mla-pass ({CONFIG_FILE})")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception:  # a model folder without tokenizer files is still inspectable
        tok = None
    return model, tok


def check_range(flag: str, value, low=None, high=None, *, above: bool = False) -> None:
    """A numeric option (None: not given) within [low, high] (``above``: strictly above ``low``),
    else a ``ValueError`` naming the flag: checked before any work, reported as one line."""
    if value is None:
        return
    too_low = low is not None and (value <= low if above else value < low)
    if too_low or (high is not None and value > high):
        lower = f"> {low}" if above else f">= {low}"
        want = lower if high is None else f"in {'(' if above else '['}{low}, {high}]"
        raise ValueError(f"{flag} must be {want}, got {value}")
