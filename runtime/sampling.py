"""Next-token choice from logits, in numpy: greedy, temperature, top-k, top-p.

The order and the tie rules follow Hugging Face's logits processors, so the same settings mean
the same thing here: temperature first, then top-k (every logit below the k-th largest is
removed, so ties at the k-th value are all kept), then top-p (the smallest set of most probable
tokens whose probability reaches p; the most probable token always stays). Temperature 0 is
greedy (argmax, the lowest id on ties). Sampling draws from a ``numpy.random.Generator``, so a
seed makes it deterministic.

Names carry shapes: ``logits_BV`` is [batch, vocab].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0          # 0 = greedy
    top_k: int | None = None          # keep the k most likely tokens (None = all)
    top_p: float | None = None        # keep the smallest set reaching probability p (None = all)

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and np.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer))
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def greedy(logits_BV: np.ndarray) -> np.ndarray:
    return np.argmax(logits_BV, axis=-1).astype(np.int64)


def top_k_mask(logits_BV: np.ndarray, k: int) -> np.ndarray:
    """True where a token survives top-k: its logit is at least the k-th largest of its row."""
    vocab = logits_BV.shape[-1]
    if k >= vocab:
        return np.ones(logits_BV.shape, dtype=bool)
    kth_B1 = np.partition(logits_BV, vocab - k, axis=-1)[..., vocab - k:vocab - k + 1]
    return logits_BV >= kth_B1


def top_p_mask(probs_BV: np.ndarray, p: float) -> np.ndarray:
    """True where a token survives top-p (nucleus): sorted by probability, a token is kept while
    the mass of the tokens before it is below p. Ties are broken by token id (stable sort)."""
    order_BV = np.argsort(-probs_BV, axis=-1, kind="stable")
    sorted_BV = np.take_along_axis(probs_BV, order_BV, axis=-1)
    before_BV = np.zeros_like(sorted_BV)                  # exclusive cumsum (no subtraction round-off)
    np.cumsum(sorted_BV[..., :-1], axis=-1, out=before_BV[..., 1:])
    keep_sorted_BV = before_BV < p
    keep_sorted_BV[..., 0] = True
    keep_BV = np.empty_like(keep_sorted_BV)
    np.put_along_axis(keep_BV, order_BV, keep_sorted_BV, axis=-1)
    return keep_BV


def softmax(x_BV: np.ndarray) -> np.ndarray:
    x = x_BV.astype(np.float64)
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def distribution(logits_BV: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The probabilities sampling draws from (float64, rows sum to 1); needs temperature > 0."""
    if config.greedy:
        raise ValueError("temperature 0 is greedy: there is no distribution to sample from")
    scaled_BV = logits_BV.astype(np.float64) / config.temperature
    if config.top_k is not None:
        scaled_BV = np.where(top_k_mask(scaled_BV, int(config.top_k)), scaled_BV, -np.inf)
    probs_BV = softmax(scaled_BV)
    if config.top_p is not None and config.top_p < 1:
        probs_BV = np.where(top_p_mask(probs_BV, config.top_p), probs_BV, 0.0)
        probs_BV /= probs_BV.sum(axis=-1, keepdims=True)
    return probs_BV


def sample(logits_BV: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """One token id per row: argmax when greedy, else a draw from ``distribution``."""
    if logits_BV.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {logits_BV.shape}")
    if config.greedy:
        return greedy(logits_BV)
    probs_BV = distribution(logits_BV, config)
    cdf_BV = np.cumsum(probs_BV, axis=-1)
    u_B1 = rng.random((logits_BV.shape[0], 1)) * cdf_BV[:, -1:]
    # inverse CDF: the first index whose cumulative mass exceeds u (zero-mass tokens never
    # qualify); if rounding puts u at the total, the last token with mass
    above_BV = cdf_BV > u_B1
    last_B = probs_BV.shape[-1] - 1 - np.argmax(probs_BV[:, ::-1] > 0, axis=-1)
    return np.where(above_BV.any(axis=-1), np.argmax(above_BV, axis=-1), last_B).astype(np.int64)
