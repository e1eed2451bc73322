"""Lowering of a decode-step program to deployable engines (installed as ``mla_pass.export``).

``to_onnx(model, out_dir, ...)`` (``onnx.py``) writes a folder the torch-free runtime runs: the
decode-step program with the (compressed) KV cache as graph inputs and outputs, after the
lowering passes of ``mla_pass.lowering`` and onnxruntime's fusions (``fusion/``). Imported
lazily: ``import mla_pass.export`` needs neither onnx nor onnxscript until ``to_onnx`` is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"to_onnx": "mla_pass.export.onnx", "ExportError": "mla_pass.export.onnx"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mla_pass.export' has no attribute {name!r}")
