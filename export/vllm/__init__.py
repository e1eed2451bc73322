"""Serving converted models on vLLM: a checkpoint export and an out-of-tree model plugin.

``to_vllm(model, out_dir)`` (``checkpoint.py``) writes a Hugging Face-style folder whose config
says DeepSeek-style MLA (``model_type: deepseek_v2``, ``kv_lora_rank``...), so vLLM allocates a
paged latent cache and runs its MLA kernels; the architecture it names is the plugin's
(``model.py``: vLLM's own Llama decoder with our latent attention), registered through the
``vllm.general_plugins`` entry point (``plugin.register``). ``reference.py`` computes the same
attention in plain torch, to check a folder without vLLM. Nothing here imports vLLM except
``model.py``, which only vLLM loads.
"""
from __future__ import annotations

from .checkpoint import LAYOUTS, to_vllm

__all__ = ["LAYOUTS", "to_vllm"]
