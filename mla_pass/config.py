"""Configuration of a conversion: one frozen dataclass, validated where it is built."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

ROPE_STRATEGIES = ("auto", "high", "low", "uniform", "2-norm", "score-error")
SVD_MODES = ("joint", "split")
NOPE_FITS = ("auto", "none", "uniform", "attention", "attention-centered")
NOPE_MAPS = ("rotation", "general")
ROPE_MIXES = ("auto", "pca", "none")


@dataclass(frozen=True)
class MLAConfig:
    """How to turn each attention site into latent attention.

    Args:
        d_kv: latent width per kv head (the cached latent is ``n_kv_heads * d_kv`` wide);
            ``None`` keeps full rank (exact).
        rope_freqs: the rotated part of the cache, in rotary frequency pairs per kv head: each
            layer keeps ``n_kv_heads * rope_freqs`` rope slots (2 cached values each, one set
            shared by every query head); ``None`` keeps every pair the model rotates (exact), 0
            drops RoPE entirely.
        rope_strategy: which pairs stay rotated: ``"auto"`` (the default: ``"score-error"`` when
            calibration tokens are given, else ``"high"``), ``"high"`` (fastest), ``"low"`` (slowest),
            ``"uniform"`` (evenly spaced), ``"2-norm"`` (largest mean ‖q‖·‖k‖ on calibration
            tokens, per layer and kv head, as in MHA2MLA) or ``"score-error"`` (largest mean squared
            change of the attention scores, over causal token pairs of the calibration text, when
            the pair loses its rotation; summed over the query heads of a group). The last two
            need ``calibration=``.
        svd: ``"joint"`` factorises [W_k_nope; W_v] together; ``"split"`` factorises them
            separately with half the latent each.
        activation_aware: factorise to minimise ‖(W − Ŵ)·X‖ on calibration activations X instead
            of ‖W − Ŵ‖ (needs ``calibration=``); still exact at full rank. ``None`` (the default):
            whenever calibration tokens are given.
        damping: ridge added to the activation covariance, relative to its mean diagonal.
        kv_budget: instead of a fixed ``d_kv`` (and, if ``rope_freqs`` is None, a fixed number of
            rotary pairs), cache at most this fraction of the original K/V values per token over
            the whole model, split per site between rotary pairs and latent width where
            calibration measures the least loss (needs ``calibration=``). Every site keeps at least
            one rotary pair (if it rotates) and one latent value per kv head.
        refit: after the SVD fixes the down-projection, refit the up-projections by ridge least
            squares to the original keys and values on the calibration activations (needs
            ``calibration=``).
        nope_fit: what scores a dropped rotary pair: ``"none"``, its raw q·k, unrotated (as
            MHA2MLA does); otherwise qᵀMk with a 2×2 map M per query head and pair (folded into
            the query), fitted by least squares to the rotated score over the causal token pairs
            of the calibration text (needs ``calibration=``): ``"uniform"`` weights every pair
            alike, ``"attention"`` by the original attention probabilities,
            ``"attention-centered"`` also ignores what is common to a query's whole row (softmax
            does; this is the row's KL to second order). ``"auto"`` (the default):
            ``"attention-centered"`` with calibration tokens, else ``"none"``. With a fit,
            ``"score-error"`` selection and ``kv_budget`` rank pairs by the error left after it.
            Exact when no pair is dropped.
        nope_map: the form of M: ``"rotation"`` (a·I + b·J, an averaged rotation) or
            ``"general"`` (any 2×2).
        rope_mix: how rope slots are formed. ``"none"``: slot (k, j) is kv head j's pair k, and
            each layer keeps ``rope_freqs`` pairs per kv head (MHA2MLA). ``"pca"``: pair k of the kv
            heads is first mixed by an orthogonal U_k (the eigenvectors of the calibration keys'
            second moment across heads; RoPE commutes with it, so nothing changes while every slot
            is kept), and the slots with the largest exact score error are kept, wherever they are
            (needs ``calibration=`` and ``rope_strategy="score-error"``; dropped slots are scored
            unrotated, so ``nope_fit`` does not apply; sites whose keys are RMS-normalised per head
            stay unmixed). ``"auto"`` (the default): ``"pca"`` when calibration tokens are given
            and the strategy resolves to ``"score-error"``, else ``"none"``.
        best_effort: leave sites that cannot be rewritten exactly untouched (with a warning and
            a line in the report) instead of raising.
        max_rope_width: with ``kv_budget``, at most this many rotated values per token at any site
            (2 per rope slot): a serving target's limit, e.g. 64 for vLLM's CPU_MLA and FlashMLA
            kernels (head size 576 = latent 512 + rope 64). ``None``: no limit.

    Example:
        >>> MLAConfig(d_kv=16, rope_freqs=4, rope_strategy="high")
        MLAConfig(d_kv=16, rope_freqs=4, rope_strategy='high', svd='joint', activation_aware=None, damping=0.01, best_effort=False, kv_budget=None, refit=False, nope_fit='auto', nope_map='rotation', rope_mix='auto', max_rope_width=None)
    """
    d_kv: int | None = None
    rope_freqs: int | None = None
    rope_strategy: str = "auto"
    svd: str = "joint"
    activation_aware: bool | None = None
    damping: float = 1e-2
    best_effort: bool = False
    kv_budget: float | None = None
    refit: bool = False
    nope_fit: str = "auto"
    nope_map: str = "rotation"
    rope_mix: str = "auto"
    max_rope_width: int | None = None

    def __post_init__(self):
        if self.d_kv is not None and (not isinstance(self.d_kv, int) or isinstance(self.d_kv, bool) or self.d_kv <= 0):
            raise ValueError(f"d_kv must be a positive integer (latent width per kv head) or None for full "
                             f"rank, got {self.d_kv!r}")
        if self.rope_freqs is not None and (not isinstance(self.rope_freqs, int) or isinstance(self.rope_freqs, bool)
                                            or self.rope_freqs < 0):
            raise ValueError(f"rope_freqs must be a non-negative integer (frequency pairs kept per head) or None "
                             f"to keep all, got {self.rope_freqs!r}")
        if self.rope_strategy not in ROPE_STRATEGIES:
            raise ValueError(f"rope_strategy must be one of {ROPE_STRATEGIES}, got {self.rope_strategy!r}")
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise ValueError(f"damping must be a non-negative number, got {self.damping!r}")
        if self.nope_fit not in NOPE_FITS:
            raise ValueError(f"nope_fit must be one of {NOPE_FITS}, got {self.nope_fit!r}")
        if self.nope_map not in NOPE_MAPS:
            raise ValueError(f"nope_map must be one of {NOPE_MAPS}, got {self.nope_map!r}")
        if self.rope_mix not in ROPE_MIXES:
            raise ValueError(f"rope_mix must be one of {ROPE_MIXES}, got {self.rope_mix!r}")
        if self.rope_mix == "pca" and self.rope_strategy not in ("auto", "score-error"):
            raise ValueError(f"rope_mix='pca' chooses slots by their score error: use rope_strategy='score-error' "
                             f"(or 'auto'), not {self.rope_strategy!r}, or rope_mix='none'")
        if self.rope_mix == "pca" and self.nope_fit not in ("auto", "none"):
            raise ValueError(f"nope_fit={self.nope_fit!r} fits a map per kv head's dropped pair, which mixed slots "
                             "do not have: use rope_mix='none' with it, or nope_fit='none'")
        if self.max_rope_width is not None:
            if isinstance(self.max_rope_width, bool) or not isinstance(self.max_rope_width, int) \
                    or self.max_rope_width < 2 or self.max_rope_width % 2:
                raise ValueError(f"max_rope_width is a number of rotated values per token (2 per rope slot): an even "
                                 f"integer >= 2, got {self.max_rope_width!r}")
            if self.kv_budget is None:
                raise ValueError("max_rope_width limits what kv_budget allocates: give kv_budget too (with a fixed "
                                 "rope_freqs the width is rope_freqs * 2 * n_kv_heads)")
        if self.svd not in SVD_MODES:
            raise ValueError(f"svd must be one of {SVD_MODES}, got {self.svd!r}")
        if self.kv_budget is not None:
            if isinstance(self.kv_budget, bool) or not isinstance(self.kv_budget, (int, float)) \
                    or not 0 < self.kv_budget <= 1:
                raise ValueError(f"kv_budget is the fraction of the original KV cache to keep, in (0, 1], "
                                 f"got {self.kv_budget!r}")
            if self.d_kv is not None:
                raise ValueError("give either d_kv (a fixed latent width) or kv_budget (widths chosen per site), "
                                 "not both")

    @classmethod
    def mha2mla(cls, d_kv: int, rope_freqs: int = 4) -> "MLAConfig":
        """The published MHA2MLA recipe: 2-norm frequency selection + weight-only joint SVD."""
        return cls(d_kv=d_kv, rope_freqs=rope_freqs, rope_strategy="2-norm", svd="joint", activation_aware=False,
                   nope_fit="none", rope_mix="none")

    def resolved(self, has_calibration: bool) -> "MLAConfig":
        """The config with its automatic choices made: with calibration tokens, the measured best
        (score-error selection, activation-aware SVD, fitted maps for dropped pairs); without, the
        weight-only fallbacks."""
        strategy = self.rope_strategy
        if strategy == "auto":
            strategy = "score-error" if has_calibration and not self.exact else "high"
        aware = self.activation_aware
        if aware is None:
            aware = has_calibration and not self.exact
        mix = self.rope_mix
        if not self.drops_pairs:
            mix = "none"                  # every slot kept: nothing to choose, any mixing is exact
        elif mix == "auto":
            mix = "pca" if strategy == "score-error" and self.nope_fit in ("auto", "none") else "none"
        elif mix == "pca" and strategy != "score-error":
            raise ValueError("rope_mix='pca' ranks the mixed slots on real activations: pass calibration token ids "
                             "to convert(..., calibration=ids)")
        nope_fit = self.nope_fit
        if nope_fit == "auto":
            nope_fit = "attention-centered" if has_calibration and self.drops_pairs and mix == "none" else "none"
        return replace(self, rope_strategy=strategy, activation_aware=aware, nope_fit=nope_fit, rope_mix=mix)

    @property
    def benefits_from_calibration(self) -> bool:
        """Calibration tokens would change the result (required ones included)."""
        return self.needs_calibration or self.resolved(True) != self.resolved(False)

    @property
    def exact(self) -> bool:
        """Full rank with every rotary pair kept: the rewrite reproduces the model."""
        return self.d_kv is None and self.rope_freqs is None and self.kv_budget is None

    @property
    def needs_pair_norms(self) -> bool:
        return self.rope_strategy == "2-norm" and (self.rope_freqs is not None or self.kv_budget is not None)

    @property
    def needs_score_error(self) -> bool:
        drops_pairs = self.rope_freqs is not None or self.kv_budget is not None
        return (self.rope_strategy == "score-error" and drops_pairs) or \
            (self.kv_budget is not None and self.rope_freqs is None)

    @property
    def drops_pairs(self) -> bool:
        """Some rotary pairs may lose their rotation."""
        return self.rope_freqs is not None or self.kv_budget is not None

    @property
    def fits_nope(self) -> bool:
        """Dropped pairs are scored through a fitted map (``nope_fit`` resolved to a weighting)."""
        return self.nope_fit not in ("auto", "none")

    @property
    def needs_nope_moments(self) -> bool:
        return self.fits_nope and self.drops_pairs

    @property
    def needs_gram(self) -> bool:
        return bool(self.activation_aware) or self.refit

    @property
    def needs_rope_statistics(self) -> bool:
        return self.needs_pair_norms or self.needs_score_error or self.needs_nope_moments

    @property
    def needs_calibration(self) -> bool:
        return self.needs_rope_statistics or self.needs_gram

    @property
    def calibration_reason(self) -> str:
        """Which setting needs calibration tokens (for error messages)."""
        if self.kv_budget is not None:
            return f"kv_budget={self.kv_budget}"
        if self.needs_nope_moments:
            return f"nope_fit={self.nope_fit!r}"
        if self.needs_rope_statistics:
            return f"rope_strategy={self.rope_strategy!r}"
        return "activation_aware=True" if self.activation_aware else "refit=True"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MLAConfig":
        return cls(**d)     # fields added later default, so older saved configs still load
