"""Soak: a long generation holds its memory steady, in the torch-free runtime and in PyTorch.

SmolLM2-135M converted training-free (``MLAConfig(d_kv, rope_freqs=4)``), one prompt, ``--tokens``
new tokens (default 10,000) with no end token, greedy. Each engine runs in its own subprocess and
samples its resident set (``VmRSS``) every ``--every`` tokens:

- ``runtime``: ``OnnxEngine.generate`` on a folder exported by ``to_onnx`` (in-place cache, sized
  once to prompt + tokens, its pages resident as they are written): nothing else should grow
  (onnxruntime's allocations settle over the first ~1,500 tokens);
- ``pytorch``: ``MLAModel.step_with_cache`` token by token (what ``MLAModel.generate`` runs): the
  concatenated latent cache grows by its own bytes per token (fp32), and nothing else should.

The table gives, per engine, RSS after the first sample and at the end, and the slope of RSS over
the second half of the run (least squares, MB per 1,000 tokens) beside the cache's own growth, and
the slopes of glibc's heap in use and held free (``mallinfo2``): they told the runtime's residual
growth apart (in use, +3.3 MB per 1,000 tokens: onnxruntime's memory patterns, one kept per input
shape; the runtime now turns them off).

    python benchmarks/soak.py                          # 10,000 tokens, table + benchmarks/results/soak/soak.png
    python benchmarks/soak.py --tokens 2000 --every 100 --out /tmp/soak
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Once upon a time, in a small village by the sea,"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def malloc_mb() -> tuple[float, float]:
    """glibc's view of the heap (every arena): (bytes handed out and not freed, bytes freed but kept), in MB.
    Growth in the second while RSS grows is fragmentation, not a leak. (nan, nan) off glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return float("nan"), float("nan")
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20, m.fordblks / 2**20


def sample(n: int) -> tuple:
    return (n, rss_mb(), *malloc_mb())


def run_runtime(folder: str, tokens: int, every: int, threads: int) -> dict:
    from mla_pass.runtime import OnnxEngine

    engine = OnnxEngine(folder, threads=threads)
    engine.manifest.eos_token_ids = []                 # a soak runs to the end: no end token
    samples, generated = [], [0]
    t0 = time.perf_counter()

    def on_token(row, token, piece):
        generated[0] += 1
        if generated[0] % every == 0:
            samples.append(sample(generated[0]))

    engine.generate(PROMPT, max_new_tokens=tokens, on_token=on_token)
    return {"samples": samples, "seconds": time.perf_counter() - t0,
            "cache_bytes_per_token": engine.manifest.kv_cache_bytes_per_token()}


def run_pytorch(d_kv: int, tokens: int, every: int, threads: int) -> dict:
    import torch

    import mla_pass
    from mla_pass import assets

    torch.set_num_threads(threads)
    model, tok = assets.load_smollm2()
    mla = mla_pass.convert(model, mla_pass.MLAConfig(d_kv=d_kv, rope_freqs=4), progress=False)
    del model
    ids = tok(PROMPT, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    samples = []
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, *cache = mla.step_with_cache(ids, mask, mla.empty_cache(1))
        for n in range(1, tokens + 1):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            logits, *cache = mla.step_with_cache(nxt, mask, cache)
            if n % every == 0:
                samples.append(sample(n))
    return {"samples": samples, "seconds": time.perf_counter() - t0,
            "cache_bytes_per_token": mla.kv_cache_bytes_per_token(torch.float32)}


def slope_mb_per_1k(samples, column: int = 1) -> float:
    """Least-squares slope of ``column`` (1 RSS, 2 malloc in use, 3 malloc held free) over the second half."""
    half = samples[len(samples) // 2:]
    xs, ys = [s[0] for s in half], [s[column] for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def export(d_kv: int, max_length: int, folder: Path) -> Path:
    import mla_pass
    from mla_pass import assets
    from mla_pass.export import to_onnx

    if (folder / "manifest.json").is_file():
        return folder
    model, tok = assets.load_smollm2()
    mla = mla_pass.convert(model, mla_pass.MLAConfig(d_kv=d_kv, rope_freqs=4), progress=False)
    return to_onnx(mla, folder, tokenizer=tok, max_length=max_length)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=250, help="sample RSS every N tokens")
    parser.add_argument("--d-kv", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["runtime", "pytorch"], choices=["runtime", "pytorch"])
    parser.add_argument("--out", default="benchmarks/results/soak")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens < 2 * args.every or args.every < 1:
        parser.error("--tokens must be at least twice --every (>= 1): the slope needs samples")
    if args.worker:                                  # one engine in this fresh process
        run = run_runtime(args.folder, args.tokens, args.every, args.threads) if args.worker == "runtime" \
            else run_pytorch(args.d_kv, args.tokens, args.every, args.threads)
        print(json.dumps(run))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = None
    if "runtime" in args.engines:
        length = max(args.tokens, 10_000) + 64         # one export serves every run up to 10k tokens
        folder = export(args.d_kv, length, Path.home() / ".cache" / "mla-pass" / "exports" /
                        f"soak_dkv{args.d_kv}_len{length}")
    results = {}
    for engine in args.engines:
        cmd = [sys.executable, __file__, "--worker", engine, "--tokens", str(args.tokens), "--every", str(args.every),
               "--d-kv", str(args.d_kv), "--threads", str(args.threads), "--folder", str(folder)]
        print(f"{engine}: {args.tokens:,} tokens ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode:
            raise SystemExit(f"{engine} failed:\n{done.stderr[-3000:]}")
        results[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = ["| engine | tokens | RSS at first sample MB | RSS at end MB | slope, 2nd half (MB / 1k tokens) | "
            "cache growth (MB / 1k tokens) | malloc in use, slope | malloc held free, slope | s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for engine, r in results.items():
        s = r["samples"]
        growth = r["cache_bytes_per_token"] * 1000 / 2**20
        rows.append(f"| {engine} | {args.tokens:,} | {s[0][1]:.1f} | {s[-1][1]:.1f} | {slope_mb_per_1k(s):.2f} | "
                    f"{growth:.2f} | {slope_mb_per_1k(s, 2):.2f} | {slope_mb_per_1k(s, 3):.2f} | {r['seconds']:.0f} |")
    table = "\n".join(rows)
    head = (f"SmolLM2-135M, MLAConfig(d_kv={args.d_kv}, rope_freqs=4), one prompt, greedy, {args.threads} threads. "
            "Cache growth is the cache's own bytes per token: the runtime's in-place buffer is allocated once for "
            "prompt + tokens but its pages become resident as tokens are written; PyTorch concatenates an fp32 "
            "latent cache each step. A slope at the cache growth means nothing else grows. The malloc columns are "
            "glibc's heap over every arena (mallinfo2): bytes in use (the cache buffer counts whole from its "
            "allocation) and bytes freed but kept; in use growing is something held, kept growing is fragmentation.")
    print(head + "\n\n" + table)
    (out / "soak.md").write_text(head + "\n\n" + table + "\n")
    (out / "soak.json").write_text(json.dumps(results))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for engine, r in results.items():
        ax.plot([s[0] for s in r["samples"]], [s[1] for s in r["samples"]], marker=".", label=engine)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(f"Soak: {args.tokens:,}-token generation, SmolLM2-135M d_kv={args.d_kv}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=120)
    print(f"plot: {out / 'soak.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
