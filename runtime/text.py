"""Incremental detokenisation for streaming, and stop strings.

Decoding one token at a time goes wrong for byte-level BPE: a multi-byte character can span
tokens (the first half decodes to U+FFFD), and some decoders drop or add the leading space of
a word depending on what precedes it. So each step decodes a short window — the tokens since
the last emitted text plus the few before them — and emits only the new suffix, and only once
it no longer ends in an incomplete character (the approach of Hugging Face's text-generation-
inference).
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed token ids one by one; get the text each one completes (often "" mid-character)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""                  # everything emitted so far
        self._prefix = 0                # window start: tokens before it never change the output
        self._read = 0                  # tokens up to here are already in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            piece = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """The rest of the text once no more tokens will come (it may end in U+FFFD)."""
        full = self._decode(self.ids)
        piece = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += piece
        return piece


def find_stop(text: str, stops: list[str], new_chars: int) -> int:
    """Index in ``text`` where the earliest stop string that the last ``new_chars`` characters
    completed begins, or -1."""
    best = -1
    for s in stops:
        start = max(0, len(text) - new_chars - len(s) + 1)
        i = text.find(s, start)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (so must not be
    streamed yet): the longest proper prefix of any stop string that ``text`` ends with."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold
