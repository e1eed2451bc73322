"""Runtime for exported engines (installed as ``mla_pass.runtime``): numpy, onnxruntime and
tokenizers only — it imports no torch, so it ships to edge devices (a test checks that in a
fresh interpreter).

    from mla_pass.runtime import OnnxEngine
    engine = OnnxEngine("out/smollm2-mla", threads=2)
    print(engine.generate("The capital of France is", max_new_tokens=16).texts[0])

- ``OnnxEngine`` (engine.py): reads and verifies the folder's manifest, builds the onnxruntime
  session (CUDA if available, else CPU), ``generate`` for batches of prompts (left padding,
  greedy / temperature / top-k / top-p, stop strings and ids, streaming callback) and ``step``.
- ``KVCache`` (cache.py): cache buffers preallocated to the longest prompt + new tokens, bound
  with IO binding (ping-pong for a concatenating program, one shared buffer for an in-place one).
- ``sampling.py``: the token choice in numpy; ``manifest.py``: the folder contract;
  ``results.py``: what ``step`` and ``generate`` return.
"""
from .cache import CacheError, KVCache, check_cache
from .engine import EngineError, OnnxEngine, choose_providers, positions
from .manifest import CacheEntry, Manifest, ManifestError
from .results import Completion, GenerationResult, StepOutput
from .sampling import SamplingConfig, sample

__all__ = ["CacheEntry", "CacheError", "Completion", "EngineError", "GenerationResult", "KVCache", "Manifest",
           "ManifestError", "OnnxEngine", "SamplingConfig", "StepOutput", "check_cache", "choose_providers",
           "positions", "sample"]
