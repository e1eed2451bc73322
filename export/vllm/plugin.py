"""vLLM's entry point into mla-pass (``vllm.general_plugins``): registers the model class by name.

vLLM calls ``register()`` in every process it starts; the class itself (``model.py``) is named as
a string, so vLLM imports it, and vLLM with it, only when a folder asks for it.
"""
from __future__ import annotations

from .folder import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"mla_pass.export.vllm.model:{ARCHITECTURE}")
