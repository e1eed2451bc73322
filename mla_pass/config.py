"""Configuration of a conversion: one frozen dataclass, validated where it is built."""
from __future__ import annotations

from dataclasses import asdict, dataclass

ROPE_STRATEGIES = ("high", "low", "uniform", "2-norm")
SVD_MODES = ("joint", "split")


@dataclass(frozen=True)
class MLAConfig:
    """How to turn each attention site into latent attention.

    Args:
        d_kv: latent width per kv head (the cached latent is ``n_kv_heads * d_kv`` wide);
            ``None`` keeps full rank (exact).
        rope_freqs: rotary frequency pairs kept per kv head (each costs 2 cached values per kv
            head); ``None`` keeps every pair the model rotates (exact), 0 drops RoPE entirely.
        rope_strategy: which pairs stay rotated: ``"high"`` (fastest), ``"low"`` (slowest),
            ``"uniform"`` (evenly spaced) or ``"2-norm"`` (largest mean ‖q‖·‖k‖ on calibration
            tokens, per layer and kv head, as in MHA2MLA; needs ``calibration=``).
        svd: ``"joint"`` factorises [W_k_nope; W_v] together; ``"split"`` factorises them
            separately with half the latent each.
        activation_aware: factorise to minimise ‖(W − Ŵ)·X‖ on calibration activations X instead
            of ‖W − Ŵ‖ (needs ``calibration=``); still exact at full rank.
        damping: ridge added to the activation covariance, relative to its mean diagonal.
        best_effort: leave sites that cannot be rewritten exactly untouched (with a warning and
            a line in the report) instead of raising.

    Example:
        >>> MLAConfig(d_kv=16, rope_freqs=4, rope_strategy="high")
        MLAConfig(d_kv=16, rope_freqs=4, rope_strategy='high', svd='joint', activation_aware=False, damping=0.01, best_effort=False)
    """
    d_kv: int | None = None
    rope_freqs: int | None = None
    rope_strategy: str = "high"
    svd: str = "joint"
    activation_aware: bool = False
    damping: float = 1e-2
    best_effort: bool = False

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
        if self.svd not in SVD_MODES:
            raise ValueError(f"svd must be one of {SVD_MODES}, got {self.svd!r}")

    @classmethod
    def mha2mla(cls, d_kv: int, rope_freqs: int = 4) -> "MLAConfig":
        """The published MHA2MLA recipe: 2-norm frequency selection + weight-only joint SVD."""
        return cls(d_kv=d_kv, rope_freqs=rope_freqs, rope_strategy="2-norm", svd="joint", activation_aware=False)

    @property
    def needs_rope_statistics(self) -> bool:
        return self.rope_strategy == "2-norm" and self.rope_freqs is not None

    @property
    def needs_calibration(self) -> bool:
        return self.needs_rope_statistics or self.activation_aware

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MLAConfig":
        return cls(**d)
