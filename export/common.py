"""What the exporters share: their error type, and a way to silence a library's chatty logger."""
from __future__ import annotations

import contextlib
import logging


class ExportError(RuntimeError):
    pass


@contextlib.contextmanager
def quiet(logger_name: str, level: int = logging.ERROR):
    """Raise ``logger_name``'s level for the block: torch.onnx logs a line per optional library it
    does not find (torchvision), onnxruntime's quantizer one per weight; not ours to show."""
    log = logging.getLogger(logger_name)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)
