"""The ``mla-pass`` command: ``inspect | convert | export | generate | eval | recover | demo``."""
from .commands import main

__all__ = ["main"]
