"""A site's plan: everything needed to build its latent attention module with the right shapes (saved with a model)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


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
    rope_dims: list[list[int]]       # per kv head, the kept rotated dims (2r each)
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

    @property
    def rope_width(self) -> int:
        return len(self.rope_dims[0]) if self.rope_dims else 0

    @property
    def key_scale_groups(self) -> int:
        return {None: 0, "head": self.n_kv_heads, "all": 1}[self.key_norm]

    @property
    def cache_kinds(self) -> list[str]:
        """The cache tensors of this site, in graph I/O order."""
        return ["latent"] + (["rope_key"] if self.rope_width else []) + (["key_scale"] if self.key_norm else [])

    def cache_shape(self, kind: str, batch: int, length: int) -> tuple[int, ...]:
        return {"latent": (batch, length, self.latent_dim),
                "rope_key": (batch, self.n_kv_heads, length, self.rope_width),
                "key_scale": (batch, self.key_scale_groups, length),
                "latent_scale": (batch, length)}[kind]         # int8 latent cache only

    @property
    def cached_values_per_token(self) -> int:
        return self.latent_dim + self.n_kv_heads * self.rope_width + self.key_scale_groups

    def to_dict(self) -> dict:
        return asdict(self)
