"""Program → program passes that prepare a decode-step program for export, in one order.

Every pass has one signature, ``pass_(program: StepProgram, settings: LoweringSettings) -> int``:
it mutates ``program`` (graph, modules, cache spec), returns how many attention sites it changed
(0 when the settings do not ask for it or the program has nothing it applies to) and leaves what a
reader of the export should know in ``program.notes``. ``lower`` walks ``PASSES`` in order::

    lower_in_place      past inputs → preallocated buffers written in place    (in_place.py)
    lower_group_query   the baseline's sites → GroupQueryAttention, in place    (group_query.py)
    lower_int8_latent   the latent cache → 8-bit codes + a scale per token      (int8_latent.py)
    lower_absorbed      W_uk, W_uv folded into the q and o projections          (absorb.py)

The order matters: GroupQueryAttention reads in-place buffers, and the absorbed fold probes the
program with the cache layout the earlier passes left. Each module also keeps its graph-level
function (``to_in_place``, ``use_group_query_attention``, ``to_int8_latent``,
``absorb_projections``) for callers that hold a bare ``GraphModule``.

Not a pass of the export: ``static_cache.to_static_cache`` makes the PyTorch decode program over
buffers written in place (``mla_pass.decode.StaticCacheDecoder``, CUDA graphs).
"""
from .absorb import lower_absorbed
from .group_query import lower_group_query
from .in_place import lower_in_place
from .int8_latent import lower_int8_latent
from .program import CACHE_UPDATES, LATENT_CACHES, LoweringSettings, StepProgram

PASSES = (lower_in_place, lower_group_query, lower_int8_latent, lower_absorbed)


def lower(program: StepProgram, settings: LoweringSettings) -> dict[str, int]:
    """Run every pass in order on ``program`` → {pass name: sites it changed}."""
    return {p.__name__: p(program, settings) for p in PASSES}


__all__ = ["CACHE_UPDATES", "LATENT_CACHES", "PASSES", "LoweringSettings", "StepProgram", "lower"]
