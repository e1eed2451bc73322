"""mla-pass: rewrite the attention of a pretrained decoder into Multi-head Latent Attention.

Imports are lazy so that ``import mla_pass.runtime`` (numpy + onnxruntime only) never pulls in
torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "MLAConfig": "mla_pass.config",
    "convert": "mla_pass.pipeline",
    "MLAModel": "mla_pass.model",
    "load": "mla_pass.pipeline",
    "kv_cache_bytes_per_token": "mla_pass.inspect",
    "inspect_model": "mla_pass.inspect",
    "UnsupportedAttentionError": "mla_pass.frontend.sites",
    "NoAttentionError": "mla_pass.frontend.sites",
    "CheckpointError": "mla_pass.persist",
    "recover": "mla_pass.quality.recovery",
    "RecoveryConfig": "mla_pass.quality.recovery",
    "distill": "mla_pass.quality.distillation",
    "DistillConfig": "mla_pass.quality.distillation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mla_pass' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
