"""Passkey retrieval: a key hidden at some depth of a long prompt, asked for at the end."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from .evaluate import device_of, logits_of
from .windows import HELD_OUT_START, HELD_OUT_TEXT

# -- passkey retrieval -------------------------------------------------------------------------
FILLER_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it.")


NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."


QUESTION = "What is the pass key?"


ANSWER_PREFIX = "The pass key is"


@dataclass(frozen=True)
class PasskeyConfig:
    """Args:
        lengths: prompt lengths in tokens (the whole prompt, instruction and question included).
        depths: where the key sits in the filler, as a fraction (0 = start, 1 = just before the question).
        trials: keys per (length, depth).
        filler: ``"text"`` (real held-out prose, the harder distractor) or ``"sentence"`` (the
            classic repeated "The grass is green. ..." sentences).
        chat: wrap the prompt in the tokenizer's chat template. Off by default: SmolLM2-135M-Instruct
            retrieves 3/3 keys at 1k tokens as plain text but 2/3 (sentence filler) and 0/3 (text
            filler) inside its chat template.
        seed: draws the keys.
    """
    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    trials: int = 1
    filler: str = "text"
    chat: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.filler not in ("sentence", "text"):
            raise ValueError(f"filler must be 'sentence' or 'text', got {self.filler!r}")
        if not self.lengths or not self.depths or self.trials < 1:
            raise ValueError("passkey needs at least one length, one depth and one trial")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths are fractions in [0, 1], got {self.depths}")


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    answer: str
    correct: bool


@dataclass
class PasskeyResult:
    trials: list[PasskeyTrial] = field(default_factory=list)

    def score(self, length: int | None = None) -> float:
        """Fraction of exact retrievals (at one prompt length, or over all)."""
        chosen = [t for t in self.trials if length is None or t.length == length]
        return sum(t.correct for t in chosen) / max(len(chosen), 1)

    @property
    def by_length(self) -> dict[int, float]:
        return {n: self.score(n) for n in sorted({t.length for t in self.trials})}


def passkey_prompt(tokenizer, length: int, depth: float, key: str, filler: str = "text",
                   chat: bool = False, cache_dir=None) -> list[int]:
    """Token ids of one passkey prompt of exactly ``length`` tokens: instruction, filler with the
    needle at ``depth`` (snapped to a sentence boundary), question, and the answer's first words."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template")
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    head, tail = f"{INSTRUCTION}\n", f"\n{QUESTION}"
    if chat:
        before, after = _chat_wrapper(tokenizer)
        head, tail = before + head, tail + after + ANSWER_PREFIX
    else:
        tail = tail + " " + ANSWER_PREFIX
    head_ids, tail_ids, needle_ids = enc(head), enc(tail), enc(" " + NEEDLE.format(key=key))
    budget = length - len(head_ids) - len(tail_ids) - len(needle_ids)
    sentences = _filler_sentences(tokenizer, filler, budget, cache_dir)
    if budget < 1 or not sentences:
        raise ValueError(f"a passkey prompt needs more than {length - budget} tokens; use a length of at least "
                         f"{length - budget + 16}")
    body: list[list[int]] = []
    used = 0
    for s in sentences:               # whole sentences while they fit, then pad with the last one cut
        take = s[: budget - used]
        body.append(take)
        used += len(take)
        if used == budget:
            break
    starts = [0]
    for s in body:
        starts.append(starts[-1] + len(s))
    cut = min(range(len(body) + 1), key=lambda i: abs(starts[i] - depth * budget))
    flat_before = [t for s in body[:cut] for t in s]
    flat_after = [t for s in body[cut:] for t in s]
    ids = head_ids + flat_before + needle_ids + flat_after + tail_ids
    assert len(ids) == length, (len(ids), length)
    return ids


def _chat_wrapper(tokenizer) -> tuple[str, str]:
    """(text before, text after) the user's message in the tokenizer's chat template, generation prompt included."""
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    before, after = text.split(marker)
    return before, after


def _filler_sentences(tokenizer, filler: str, budget: int, cache_dir) -> list[list[int]]:
    """Token lists of filler sentences (each with a leading space), at least ``budget`` tokens in all."""
    if filler == "sentence":
        pieces = [" " + s.strip() + "." for s in FILLER_SENTENCE.split(".") if s.strip()]
        one_round = [tokenizer(p, add_special_tokens=False).input_ids for p in pieces]
        per_round = sum(len(s) for s in one_round)
        return one_round * (budget // max(per_round, 1) + 1)
    from .. import assets
    text = assets.read_text(HELD_OUT_TEXT, cache_dir)
    words = " ".join(text.split()[HELD_OUT_START // 2:])      # skip the header; one line of prose
    out, total = [], 0
    for s in re.split(r"(?<=[.!?])\s+", words):
        ids = tokenizer(" " + s, add_special_tokens=False).input_ids
        out.append(ids)
        total += len(ids)
        if total >= budget:
            break
    return out


@torch.no_grad()
def greedy_continuation(model, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The next ``max_new_tokens`` greedy tokens after ``ids`` [1, S] (cached where the model can;
    a model with its own ``greedy(ids, n)``, e.g. an exported engine's adapter, decodes itself)."""
    from ..frontend.capture import is_hf_model
    from ..model import MLAModel

    if hasattr(model, "greedy"):
        return model.greedy(ids, max_new_tokens)
    if isinstance(model, MLAModel):
        out = model.generate(ids, max_new_tokens=max_new_tokens)
    elif is_hf_model(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    else:                               # any decoder: recompute the whole sequence each step
        out = ids
        for _ in range(max_new_tokens):
            out = torch.cat([out, logits_of(model, out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[:, ids.shape[1]:]


def passkey(model, tokenizer, config: PasskeyConfig | None = None, *, progress: bool = True,
            cache_dir=None) -> PasskeyResult:
    """Passkey retrieval: for each length, depth and trial, hide a random 5-digit key in filler
    text and check that greedy decoding gives it back exactly (the first number answered).

    Example:
        >>> passkey(mla, tok, PasskeyConfig(lengths=(1024,))).score()                 # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    config = config or PasskeyConfig()
    rng = random.Random(config.seed)
    jobs = [(n, d, str(rng.randrange(10_000, 100_000))) for n in config.lengths for d in config.depths
            for _ in range(config.trials)]
    device = device_of(model)
    result = PasskeyResult()
    for length, depth, key in tqdm(jobs, desc="passkey", disable=not progress, leave=False):
        ids = torch.tensor([passkey_prompt(tokenizer, length, depth, key, config.filler, config.chat, cache_dir)],
                           device=device)
        new = greedy_continuation(model, ids, max_new_tokens=len(key) + 4)
        answer = tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
        found = re.search(r"\d+", answer)
        result.trials.append(PasskeyTrial(length, depth, key, answer, found is not None and found.group() == key))
    return result
