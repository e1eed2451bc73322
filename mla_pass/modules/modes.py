"""How an attention module runs, as declared and checked modes (not free strings).

The modules are built by the pass and then adjusted by others: ``MLAModel.set_form``, recovery and
distillation (the decompressed form while training), the lowering passes (in-place cache, int8
latent, GroupQueryAttention). Each such knob is a ``Mode`` on the module class: the values it may
take are listed where the module is defined, and setting anything else is a ``ValueError``.
"""
from __future__ import annotations

from ..runtime.manifest import CACHE_UPDATES  # noqa: F401  (the runtime's contract: concat | in_place)


class Mode:
    """A data descriptor: one of ``values`` (``default`` until set), per module instance."""

    def __init__(self, values: tuple[str, ...], default: str, doc: str = ""):
        if default not in values:
            raise ValueError(f"default {default!r} is not one of {values}")
        self.values, self.default, self.__doc__ = values, default, doc

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.slot = name, f"_mode_{name}"

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__.get(self.slot, self.default)

    def __set__(self, obj, value) -> None:
        if value not in self.values:
            raise ValueError(f"{type(obj).__name__}.{self.name} must be one of {self.values}, got {value!r}")
        obj.__dict__[self.slot] = value


FORMS = ("auto", "absorbed", "decompressed")
# how a module writes its cache: the runtime's two (exported programs), and "static": preallocated
# buffers written in place at the given positions (``lowering.static_cache``, CUDA graphs)
MODULE_CACHE_UPDATES = (*CACHE_UPDATES, "static")
LATENT_CACHES = ("float", "int8", "int4")
