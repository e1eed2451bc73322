"""A site's plan: everything needed to build its latent attention module with the right shapes (saved with a model)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


class RetiredLayoutError(ValueError):
    """A saved plan in a layout this version no longer reads."""


@dataclass
class SitePlan:
    """Everything needed to build a site's module with the right shapes (saved with a model)."""
    index: int
    layer: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    value_dim: int
    hidden: int
    latent_dim: int
    rope_pairs: list[list[int]]      # the dims (d0, d1) of every rotary frequency pair the model rotates
    rope_slots: list[list[int]]      # the kept rotated slots [pair k, mixed component j], shared by every head
    rotated_dims: list[int]          # dims the model rotates at all
    kv_head_of_query: list[int]
    scale: float
    softcap: float | None
    is_causal: bool
    query_raw_layout: str            # "BHSD" | "BSHD"
    key_raw_layout: str
    key_bias: bool
    value_bias: bool
    svd: str
    key_norm: str | None = None      # "head" | "all": k is RMS-normalised before RoPE (Qwen3, OLMo2)
    key_norm_eps: float = 0.0
    key_norm_bias: bool = False
    nope_pairs: list[list[int]] | None = None   # all rotary pairs (dims), when dropped ones get a fitted query map
    rope_mixed: bool = False         # the slots mix each pair across kv heads (else slot (k, j) is kv head j's pair k)

    @property
    def rope_width(self) -> int:
        """Rotated values cached per token: 2 per kept slot, one set for every query head."""
        return 2 * len(self.rope_slots)

    @property
    def rope_dims_per_kv_head(self) -> list[list[int]]:
        """Unmixed slots (``rope_mixed`` False) as MHA2MLA states them: each kv head's rotated dims."""
        if self.rope_mixed:
            raise ValueError(f"{self.layer}: mixed rope slots belong to no single kv head")
        return [sorted(d for k, jj in self.rope_slots if jj == j for d in self.rope_pairs[k])
                for j in range(self.n_kv_heads)]

    @property
    def key_scale_groups(self) -> int:
        return {None: 0, "head": self.n_kv_heads, "all": 1}[self.key_norm]

    @property
    def cache_kinds(self) -> list[str]:
        """The cache tensors of this site, in graph I/O order."""
        return ["latent"] + (["rope_key"] if self.rope_width else []) + (["key_scale"] if self.key_norm else [])

    def cache_shape(self, kind: str, batch: int, length: int) -> tuple[int, ...]:
        return {"latent": (batch, length, self.latent_dim),
                "rope_key": (batch, 1, length, self.rope_width),
                "key_scale": (batch, self.key_scale_groups, length),
                "latent_scale": (batch, length)}[kind]         # int8 latent cache only

    @property
    def cached_values_per_token(self) -> int:
        return self.latent_dim + self.rope_width + self.key_scale_groups

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SitePlan":
        if "rope_dims" in d:
            raise RetiredLayoutError(f"{d.get('layer', 'a site')}: this conversion was saved by an earlier mla-pass, whose "
                             "rope keys were cached per kv head; that layout is gone (rope slots are now shared by "
                             "every head): convert the source model again with this version")
        return cls(**d)
