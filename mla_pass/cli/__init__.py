"""The ``mla-pass`` command: ``inspect | convert | export | generate | eval | recover | demo``."""
from .main import main

__all__ = ["main"]
