"""What the engine returns: one step's output, and a generation's completions with their timings."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cache import KVCache


@dataclass
class StepOutput:
    logits: np.ndarray                       # [B, S, V]
    cache: list[np.ndarray] | KVCache        # present (T+S tokens), or the advanced KVCache


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # generated, ending with the end id if one came
    text: str = ""                                         # generated text (special tokens skipped, stop string cut)
    finish_reason: str = "length"                          # "eos" | "stop" | "length"


@dataclass
class GenerationResult:
    completions: list[Completion]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    @property
    def token_ids(self) -> list[list[int]]:
        return [c.token_ids for c in self.completions]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    @property
    def new_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def tokens_per_second(self) -> float:
        seconds = self.prefill_seconds + self.decode_seconds
        return self.new_tokens / seconds if seconds > 0 else float("nan")
