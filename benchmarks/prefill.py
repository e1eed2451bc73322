"""Long prompts: prefill time and peak memory through the runtime's chunked prefill (a benchmark).

Run through ``benchmarks/decode.py --prompt-tokens N`` (same models, exports and yardsticks as its
decode rows): an N-token held-out prompt (``lcet10.txt``) goes through ``OnnxEngine.generate``
with ``--prefill-chunk`` tokens per step (0 = the whole prompt in one step), then 16 greedy
tokens; each (model, chunk) runs in its own process (its peak RSS is its own), rounds interleaved.

    python benchmarks/decode.py --prompt-tokens 4096 --models original "mla d_kv=32" \\
        --prefill-chunk 0 256 512 1024 --batch 1
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from decode import GENAI, GENAI_INT4, GENAI_INT8, PROMPT_NEW_TOKENS, _genai_threads, peak_rss_mb, weight_precision


def prefill_worker(folder: str, prompt_file: str, chunk: int, threads: int, new_tokens: int) -> dict:
    """A long prompt through ``OnnxEngine.generate`` (``chunk`` tokens per prefill step, 0 = the
    whole prompt in one step), then ``new_tokens`` greedy tokens: prefill seconds, decode ms/token,
    peak RSS of this process."""
    import numpy as np

    from mla_pass.runtime import OnnxEngine

    engine = OnnxEngine(folder, threads=threads, prefill_chunk=chunk or None)
    engine.manifest.eos_token_ids = []                 # the decode part runs to its length
    result = engine.generate([np.load(prompt_file).tolist()], max_new_tokens=new_tokens)
    return {"prefill_s": result.prefill_seconds, "peak_rss_mb": peak_rss_mb(),
            "decode_ms": 1000 * result.decode_seconds / max(result.decode_steps, 1)}


def genai_prefill_worker(folder: str, prompt_file: str, chunk: int, threads: int, new_tokens: int) -> dict:
    """The same prompt through onnxruntime-genai's own build (its default prefill)."""
    import numpy as np
    import onnxruntime_genai as og

    prompt = np.load(prompt_file).astype(np.int32)
    model = og.Model(_genai_threads(folder, threads))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens + 1, do_sample=False)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(prompt)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        generator.generate_next_token()
    return {"prefill_s": prefill, "peak_rss_mb": peak_rss_mb(),
            "decode_ms": 1000 * (time.perf_counter() - t0) / new_tokens}


def long_prompts(args, folders: dict[str, Path]) -> None:
    """--prompt-tokens: each (model, chunk) in its own process, rounds interleaved; a table and a plot."""
    import numpy as np

    from mla_pass import assets
    from mla_pass.quality.windows import held_out_windows
    from mla_pass.runtime.engine import PREFILL_CHUNK

    chunks = args.prefill_chunk or [PREFILL_CHUNK]
    _, tok = assets.load_smollm2()
    prompt_file = Path(tempfile.mkdtemp(prefix="mla-pass-prefill-")) / f"prompt_{args.prompt_tokens}.npy"
    np.save(prompt_file, held_out_windows(tok, 1, args.prompt_tokens)[0].numpy())
    runs = [(name, folder, chunk, False) for name, folder in folders.items() for chunk in chunks]
    runs[:0] = [(n, d, 0, True) for n, d in ((GENAI, args.genai), (GENAI_INT8, args.genai_int8),
                                             (GENAI_INT4, args.genai_int4)) if d]
    measured: dict[tuple, list[dict]] = {}
    for _ in range(args.repeats):
        for name, folder, chunk, genai in runs:
            cmd = [sys.executable, __file__, "--genai-prefill-worker" if genai else "--prefill-worker", str(folder),
                   str(prompt_file), str(chunk), str(args.threads), str(PROMPT_NEW_TOKENS)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"prefill worker failed for {name} (chunk {chunk}):\n{out.stderr[-2000:]}")
            measured.setdefault((name, chunk, genai), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"SmolLM2-135M, a {args.prompt_tokens:,}-token held-out prompt (lcet10.txt) through OnnxEngine.generate, "
          f"then {PROMPT_NEW_TOKENS} greedy tokens; onnxruntime CPU, {args.threads} threads, median of "
          f"{args.repeats} interleaved runs; ratios against our export of the original at the same chunk "
          "and weight precision")
    print("| model | prefill chunk | prefill s | vs original | peak RSS MB | vs original | decode ms/token |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for (name, chunk, genai), results in measured.items():
        r = {k: statistics.median(x[k] for x in results) for k in ("prefill_s", "decode_ms")}
        r.update(model=name, chunk="genai's" if genai else chunk or "whole prompt",
                 peak_rss_mb=max(x["peak_rss_mb"] for x in results))
        precision = weight_precision(name)          # against our original export of the same weights
        base = measured.get(("original" if precision == "fp32" else f"original {precision} weights", chunk, False))
        r["vs_original_prefill"] = statistics.median(x["prefill_s"] for x in results) / \
            statistics.median(x["prefill_s"] for x in base) if base else None
        r["vs_original_rss"] = r["peak_rss_mb"] / max(x["peak_rss_mb"] for x in base) if base else None
        rows.append(r)
        ratio = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
        print(f"| {name} | {r['chunk']} | {r['prefill_s']:.1f} | {ratio(r['vs_original_prefill'])} | "
              f"{r['peak_rss_mb']:,.0f} | {ratio(r['vs_original_rss'])} | {r['decode_ms']:.1f} |", flush=True)
    path = args.plot.with_name(args.plot.stem + f"_prompt{args.prompt_tokens}")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    _plot_prefill(rows, args.prompt_tokens, path.with_suffix(".png"))
    print(f"\nplot: {path.with_suffix('.png')} (numbers: {path.with_suffix('.json')})")


def _plot_prefill(rows: list[dict], tokens: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}, chunk {r['chunk']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.4), sharey=True)
    for ax, key, title in zip(axes, ("prefill_s", "peak_rss_mb"), ("prefill (s)", "peak RSS (MB)")):
        ax.barh(range(len(rows)), [r[key] for r in rows],
                color=["tab:gray" if "genai" in r["model"] else "tab:blue" for r in rows])
        ax.set_xlabel(title)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"SmolLM2-135M, a {tokens:,}-token prompt, onnxruntime CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    folder, prompt_file, chunk, threads, new = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
    run = prefill_worker if sys.argv[1] == "--prefill-worker" else genai_prefill_worker
    print(json.dumps(run(folder, prompt_file, chunk, threads, new)))


if __name__ == "__main__":
    main()
