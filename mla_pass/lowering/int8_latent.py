"""Graph surgery for an 8- or 4-bit latent cache: a step program whose cached latent is quantized.

``to_int8_latent(step, cache_spec, bits="int8")`` takes a converted step program (``rewrite(...,
with_cache=True)``, concat or in place) and gives every latent attention site one more cache
tensor, ``past_key_values.{i}.latent_scale [B, T]``, right after the site's other cache tensors;
the site's ``latent`` cache becomes 8-bit (int8 codes stored as uint8 = code + 128) or, with
``bits="int4"``, 4-bit (two codes a byte, [B, T, ⌈C/2⌉], unpacked to one code + 8 a byte for the
same attention with zero point 8). New tokens
are quantized per token as they are written (``math/int8_cache.py``); the absorbed form reads the
codes with integer GEMMs, the scales folded into scores and weights
(``math/absorbed_mqa.integer_latent_attention``). Rope keys (and Qwen3/OLMo2 key scales) stay in the float dtype: they are
2r values per kv head and carry the position signal.

Mutates ``step`` and its modules: call it on a copy.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from ..modules.latent_attention import LatentAttention
from ..rewrite import MODULES, CacheTensor
from .program import LATENT_CACHES, LoweringSettings, StepProgram

CACHE_DTYPES = LATENT_CACHES


QUANTIZED = ("int8", "int4")


def to_int8_latent(step: fx.GraphModule, cache_spec: list[CacheTensor],
                   bits: str = "int8") -> tuple[fx.GraphModule, list[CacheTensor]]:
    if bits not in QUANTIZED:
        raise ValueError(f"bits must be one of {QUANTIZED}, got {bits!r}")
    graph = step.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    output = next(n for n in graph.nodes if n.op == "output")
    logits, *presents = output.args[0]
    present_of = dict(zip(cache_spec, presents))
    calls = {int(n.target.split(".")[1]): n for n in graph.nodes
             if n.op == "call_module" and n.target.startswith(f"{MODULES}.") and n.target.count(".") == 1}
    new_spec, new_presents = [], []
    for site in dict.fromkeys(t.site for t in cache_spec):
        own = [t for t in cache_spec if t.site == site]
        call = calls[site]
        module = step.get_submodule(call.target)
        if not isinstance(module, LatentAttention):
            raise TypeError(f"site {site} is not a latent attention site: only converted programs have a latent cache")
        if module.latent_cache != "float":
            raise ValueError(f"site {site} already has an {module.latent_cache} latent cache")
        last_past = placeholders[f"past_{site}_{own[-1].kind}"]
        with graph.inserting_after(last_past):
            scale_past = graph.placeholder(f"past_{site}_latent_scale")
        at = call.args.index(last_past) + 1                   # before the in-place write index, if any
        call.args = (*call.args[:at], scale_past, *call.args[at:])
        with graph.inserting_after(call):
            scale_present = graph.call_function(operator.getitem, (call, 1 + len(own)))
        module.latent_cache = bits
        scale = CacheTensor(f"past_key_values.{site}.latent_scale", site, "latent_scale")
        new_spec += [*own, scale]
        new_presents += [present_of[t] for t in own] + [scale_present]
    output.args = ((logits, *new_presents),)
    graph.lint()
    step.recompile()
    return step, new_spec


def lower_int8_latent(program: StepProgram, settings: LoweringSettings) -> int:
    """``latent_cache="int8"`` / ``"int4"``: every converted site caches 8- / 4-bit latents → sites changed."""
    if settings.latent_cache not in QUANTIZED:
        return 0
    if program.kind != "mla":
        raise ValueError(f"latent_cache={settings.latent_cache!r} needs a converted model (mla_pass.convert): the "
                         "original has no latent")
    program.gm, program.cache_spec = to_int8_latent(program.gm, program.cache_spec, settings.latent_cache)
    program.latent_cache = settings.latent_cache
    return sum(t.kind == "latent_scale" for t in program.cache_spec)
