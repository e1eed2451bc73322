"""Fixed windows of real text (token ids) for calibration, training and held-out evaluation."""
from __future__ import annotations

import torch

HELD_OUT_TEXT = "lcet10.txt"


HELD_OUT_START = 2000


CALIBRATION_TEXT = "alice29.txt"


TRAINING_TEXTS = ("alice29.txt", "asyoulik.txt", "plrabn12.txt")     # distillation: all but the held-out text


# -- token windows ------------------------------------------------------------------------------
def text_windows(tokenizer, name: str, count: int, length: int, start: int = 0, cache_dir=None) -> torch.Tensor:
    """``count`` consecutive windows of ``length`` tokens of a bundled text → [count, length].

    Raises ``ValueError`` naming how many tokens the text has when it is too short."""
    from .. import assets

    if count < 1 or length < 2:
        raise ValueError(f"need at least 1 window of at least 2 tokens, got {count} × {length}")
    ids = tokenizer(assets.read_text(name, cache_dir), return_tensors="pt").input_ids[0]
    need = start + count * length
    if len(ids) < need:
        have = max((len(ids) - start) // length, 0)
        raise ValueError(f"{name} has {len(ids):,} tokens with this tokenizer; {count} windows × {length} tokens "
                         f"from token {start} need {need:,}. Use at most {have} windows of {length} tokens "
                         "(or shorter windows)")
    return ids[start:need].reshape(count, length).long()


def held_out_windows(tokenizer, count: int = 8, length: int = 512, cache_dir=None) -> torch.Tensor:
    """The evaluation windows: ``lcet10.txt`` from token 2000."""
    return text_windows(tokenizer, HELD_OUT_TEXT, count, length, HELD_OUT_START, cache_dir)


def calibration_windows(tokenizer, count: int = 16, length: int = 512, cache_dir=None) -> torch.Tensor:
    """Calibration / training windows: ``alice29.txt`` from its start."""
    return text_windows(tokenizer, CALIBRATION_TEXT, count, length, 0, cache_dir)


def training_windows(tokenizer, count: int | None = None, length: int = 512, cache_dir=None) -> torch.Tensor:
    """Distillation windows from ``TRAINING_TEXTS`` (never the held-out text): each text cut into
    whole ``length``-token windows, the texts interleaved window by window (so any prefix mixes
    them); ``count=None`` gives all of them. Raises ``ValueError`` when there are fewer."""
    from .. import assets

    if length < 2 or (count is not None and count < 1):
        raise ValueError(f"need at least 1 window of at least 2 tokens, got {count} × {length}")
    per_text = []
    for name in TRAINING_TEXTS:
        ids = tokenizer(assets.read_text(name, cache_dir), return_tensors="pt").input_ids[0]
        per_text.append(ids[: len(ids) // length * length].reshape(-1, length))
    rows = [t[i] for i in range(max(len(t) for t in per_text)) for t in per_text if i < len(t)]
    if not rows or (count is not None and len(rows) < count):
        raise ValueError(f"{' + '.join(TRAINING_TEXTS)} give {len(rows)} windows of {length} tokens with this "
                         f"tokenizer, fewer than the {count} asked for: ask for at most {len(rows)}")
    return torch.stack(rows[:count]).long()
