"""What a decode step pays for the KV cache in the runtime, by way of handling it.

A toy decoder (``tests/toy_onnx.py``: hidden 32, so the step is almost all cache traffic) with
SmolLM2-135M's cache sizes — 30 layers; MLA d_kv=32, r=4 (latent [B,T,96] + rope_key
[B,3,T,8], 14,400 B/token in fp32) and the original (key/value [B,3,T,64], 46,080 B/token) —
is stepped at past 512 / 2048 / 8192 four ways (by default its layers only write their cache
and skip attention, so a step is the cache handling alone; ``--attend`` adds the attention):

- ``run``: ``session.run`` with numpy past, numpy present fed back (no IO binding);
- ``bound``: IO binding, present written into preallocated ping-pong buffers (``KVCache``);
- ``in place``: the program updates its cache with TensorScatter (opset 24), past and present
  bound to one preallocated buffer, so onnxruntime skips the copy;
- ``memcpy``: numpy copying the whole cache once, for scale.

``bound − in place`` is what the Concat's copy costs per step; ``run − bound`` what IO binding
saves. Medians over ``--steps`` decode steps. Run: ``python benchmarks/runtime_cache.py``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toy_onnx import ToySpec, write_folder  # noqa: E402

from mla_pass.runtime import OnnxEngine  # noqa: E402

SHAPES = {"mla d_kv=32": dict(kind="mla", heads=3, latent=96, rope=8),
          "original": dict(kind="original", heads=3, head_dim=64)}


def _median_step(engine: OnnxEngine, past: int, steps: int, bound: bool) -> float:
    m = engine.manifest
    rng = np.random.default_rng(0)
    cache = [rng.standard_normal(e.concrete_shape(1, past)).astype(np.float32) for e in m.cache]
    if bound:
        kv = engine.new_cache(1, past + steps + 4)
        kv.load(cache, past)
        cache = kv
    times, tok = [], np.array([[1]])
    for i in range(steps + 3):
        mask = np.ones((1, past + i + 1), np.int64)
        t0 = time.perf_counter()
        out = engine.step(tok, mask, np.array([[past + i]]), cache)
        times.append(time.perf_counter() - t0)
        cache = out.cache
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--past", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attend", action="store_true", help="the toy also attends over its cache "
                        "(default: layers only write it, so the step is the cache handling alone)")
    args = parser.parse_args()
    max_len = max(args.past) + args.steps + 8
    what = "toy attends over the cache" if args.attend else "layers only write their cache"
    print(f"ms per decode step, batch 1, {args.threads} threads, median of {args.steps}; {what}")
    print("| cache | past | run (numpy) | IO binding (ping-pong) | in place (TensorScatter) | memcpy of the cache | cache MB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            engines = {}
            for update in ("concat", "in_place"):
                spec = ToySpec(vocab=64, layers=30, max_length=max_len, cache_update=update,
                                attend=args.attend, **shape)
                write_folder(Path(tmp) / f"{name}-{update}", spec)
                engines[update] = OnnxEngine(Path(tmp) / f"{name}-{update}", threads=args.threads)
            for past in args.past:
                run = _median_step(engines["concat"], past, args.steps, bound=False)
                bound = _median_step(engines["concat"], past, args.steps, bound=True)
                in_place = _median_step(engines["in_place"], past, args.steps, bound=True)
                nbytes = engines["concat"].manifest.kv_cache_bytes_per_token() * past
                src, dst = np.ones(nbytes // 4, np.float32), np.empty(nbytes // 4, np.float32)
                copy = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    np.copyto(dst, src)
                    copy.append(time.perf_counter() - t0)
                print(f"| {name} | {past} | {1e3 * run:.2f} | {1e3 * bound:.2f} | {1e3 * in_place:.2f} | "
                      f"{1e3 * statistics.median(copy):.2f} | {nbytes / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
