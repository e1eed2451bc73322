"""What every lowering pass takes: a decode-step program with its cache I/O, and the settings.

``StepProgram`` is ``MLAModel.step`` (or the unconverted baseline's ``kv_step_program``) with the
records that describe its inputs; passes mutate it in place. Its ``example_inputs`` are the
inputs passes and exporters trace and probe with: sizes ≥ 2 and distinct (size-1 dims would be
specialised), one left-padded row, caches filled with values of the right kind and dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..modules.modes import CACHE_UPDATES, LATENT_CACHES
from ..rewrite import CacheTensor

EXAMPLE = {"batch": 2, "new": 3, "past": 5}
PREFILL_FORMS = ("decompressed", "absorbed")


@dataclass(frozen=True)
class LoweringSettings:
    """Args:
        cache_update: "in_place" (past inputs are preallocated buffers written with TensorScatter,
            bound once by the runtime) or "concat" (present = past + new, a copy per step).
        latent_cache: "float", "int8" or "int4" (converted models: 8-bit latent codes, or 4-bit ones
            packed two a byte, + a scale per token).
        group_query_attention: run the unconverted baseline's sites as one GroupQueryAttention op
            each (in place only), as onnxruntime-genai exports the same model.
        absorb: fold W_uk and W_uv into the query and output projections (converted models).
        prefill: converted models, with ``absorb``: "decompressed" runs prompts (S > 1) in the
            decompressed form (K/V expanded from the written latent rows, one attention op) and
            one-token steps absorbed, chosen per call by the program (one ONNX ``If`` per site);
            "absorbed" runs every step absorbed.
    """
    cache_update: str = "in_place"
    latent_cache: str = "float"
    group_query_attention: bool = True
    absorb: bool = True
    prefill: str = "decompressed"

    def __post_init__(self):
        if self.cache_update not in CACHE_UPDATES:
            raise ValueError(f"cache_update must be one of {CACHE_UPDATES}, got {self.cache_update!r}")
        if self.latent_cache not in LATENT_CACHES:
            raise ValueError(f"latent_cache must be one of {LATENT_CACHES}, got {self.latent_cache!r}")
        if self.prefill not in PREFILL_FORMS:
            raise ValueError(f"prefill must be one of {PREFILL_FORMS}, got {self.prefill!r}")


@dataclass
class StepProgram:
    gm: fx.GraphModule                  # (input_ids, position_ids, attention_mask, *past) → (logits, *present)
    cache_spec: list[CacheTensor]
    plans: dict                         # site index → SitePlan (converted) or KVPlan (baseline)
    vocab_size: int
    kind: str                           # "mla" | "original"
    cache_update: str = "concat"        # what the program does now (lower_in_place changes it)
    latent_cache: str = "float"         # lower_int8_latent sets "int8" / "int4"
    notes: dict = field(default_factory=dict)     # what each pass reports, for the export's manifest

    def example_inputs(self, dtype: torch.dtype = torch.float32) -> tuple:
        """(input_ids [B, S], attention_mask [B, T+S], position_ids [B, S], past) for B=2, S=3, T=5;
        in place, the buffers hold T+S+4 tokens."""
        b, s, t = EXAMPLE["batch"], EXAMPLE["new"], EXAMPLE["past"]
        buffer = t + s + 4 if self.cache_update == "in_place" else t
        gen = torch.Generator().manual_seed(0)
        device = next(self.gm.parameters()).device
        ids = torch.randint(0, self.vocab_size, (b, s), generator=gen).to(device)
        mask = torch.ones(b, t + s, dtype=torch.long, device=device)
        mask[1, :2] = 0                                              # one left-padded row
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]
        int8_sites = {c.site for c in self.cache_spec if c.kind == "latent_scale"}
        past = [_example_cache(self.cache_shape(c, b, buffer), c.kind, c.site in int8_sites, gen, device, dtype)
                for c in self.cache_spec]
        return ids, mask, pos, past


    def cache_shape(self, spec: CacheTensor, batch: int, length: int) -> tuple[int, ...]:
        """The stored shape of one cache tensor (a 4-bit latent holds ⌈C/2⌉ bytes per token)."""
        shape = self.plans[spec.site].cache_shape(spec.kind, batch, length)
        if spec.kind == "latent" and self.latent_cache == "int4":
            return (*shape[:-1], (shape[-1] + 1) // 2)
        return shape


def _example_cache(shape, kind: str, int8_latent: bool, gen, device, dtype) -> torch.Tensor:
    if kind == "latent_scale":       # an int8 latent's per-token scales: positive
        return (torch.rand(shape, generator=gen) * 0.02 + 0.005).to(device, dtype)
    if kind == "latent" and int8_latent:        # 8-bit codes + 128 (or two 4-bit codes + 8)
        return torch.randint(1, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    return (torch.randn(shape, generator=gen) * 0.5).to(device, dtype)
