"""Decode speed and memory: SmolLM2-135M original vs converted, both exported by mla_pass.export.

Every model goes through the same path (capture → match → rewrite → ``to_onnx``, cache updated
in place with TensorScatter) and runs in the same onnxruntime through ``mla_pass.runtime``
with the same threads. For each (batch, past) the three models are timed back to back, each in
a fresh subprocess (so its peak RSS is its own): a cache of ``past`` random tokens is loaded
into the engine's preallocated buffers, then ``--steps`` one-token decode steps run with IO
binding; the median step is reported. Quality does not affect speed, so the converted models
use the training-free ``MLAConfig(d_kv, rope_freqs=4)``.

    python benchmarks/decode.py                      # table (markdown) + benchmarks/decode.png
    python benchmarks/decode.py --past 512 --batch 1 --steps 5      # a quick look
    python benchmarks/decode.py --genai DIR          # + onnxruntime-genai's build of the original
    python benchmarks/decode.py --genai DIR --genai-int8 DIR8 --models original "original int8 weights"
    python benchmarks/decode.py --genai-int4 DIR4 --past 8192 --batch 1 --repeats 3 \
        --models "original int4 weights" "mla d_kv=8 int4 weights" "mla d_kv=32 int4 weights"
    python benchmarks/decode.py --models original "mla d_kv=8 int8 cache" --extra "NAME=DIR" --repeats 3

Yardsticks: ``--genai`` is onnxruntime-genai's fp32 build of the original (``-p fp32``),
``--genai-int8`` / ``--genai-int4`` its int8 / int4 builds (``-p int8`` / ``-p int4``: MatMulNBits,
8 or 4 bits, blocks of 32, symmetric, accuracy level 4, lm_head quantized, embedding fp32 — what
``to_onnx(quantize="int8" | "int4")`` does). Each row's "vs genai" compares equal weight precision:
rows whose name says "int8 weights" / "int4 weights" against that build, the others against the
fp32 build.

Exports are cached under ``~/.cache/mla-pass/exports/<source fingerprint>/``: a change to the
code that shapes the exported program exports afresh.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {            # name: (d_kv or None for the original, latent cache dtype, weight quantization[, prefill form])
    "original": (None, "float", None),
    "mla d_kv=32": (32, "float", None),
    "mla d_kv=8": (8, "float", None),
    "mla d_kv=32 int8 cache": (32, "int8", None),
    "mla d_kv=8 int8 cache": (8, "int8", None),
    "original int8 weights": (None, "float", "int8"),
    "mla d_kv=8 int8 weights": (8, "float", "int8"),
    "mla d_kv=8 int8 weights+cache": (8, "int8", "int8"),
    "mla d_kv=32 int8 weights": (32, "float", "int8"),
    "mla d_kv=32 int8 weights+cache": (32, "int8", "int8"),
    "original int4 weights": (None, "float", "int4"),
    "mla d_kv=8 int4 weights": (8, "float", "int4"),
    "mla d_kv=32 int4 weights": (32, "float", "int4"),
    "mla d_kv=8 int4 cache": (8, "int4", None),
    "mla d_kv=32 int4 cache": (32, "int4", None),
    "mla d_kv=8 int4 weights+cache": (8, "int4", "int4"),
    "mla d_kv=32 int4 weights+cache": (32, "int4", "int4"),
    # the one-form program of earlier exports (prompts absorbed too), for the prefill comparison
    "mla d_kv=32 absorbed prefill": (32, "float", None, "absorbed"),
    "mla d_kv=32 int4 weights absorbed prefill": (32, "float", "int4", "absorbed"),
}
DEFAULT_MODELS = ["original", "mla d_kv=32", "mla d_kv=8"]
GENAI = "onnxruntime-genai (original)"
GENAI_INT8 = "onnxruntime-genai int8 weights (original)"
GENAI_INT4 = "onnxruntime-genai int4 weights (original)"
ROPE_FREQS = 4
PROMPT_NEW_TOKENS = 16         # streamed after a long prompt (--prompt-tokens)
MODEL_CONTEXT = 8192           # SmolLM2-135M's max_position_embeddings: the exports' default max_length


def weight_precision(name: str) -> str:
    """The weights a row's model runs on, by its name: its yardstick is genai's build of the same."""
    return next((bits for bits in ("int8", "int4") if f"{bits} weights" in name), "fp32")


def export_all(cache_dir: Path, variants: dict, max_length: int | None = None) -> dict[str, Path]:
    """Export each variant once into ``cache_dir`` (reused on later runs of the same source);
    ``max_length`` above the model's own (8,192) for long prompts."""
    import torch

    import mla_pass
    from mla_pass import assets
    from mla_pass.export.onnx import to_onnx

    suffix = "" if max_length is None else f"_len{max_length}"
    folders = {name: cache_dir / source_fingerprint() /
               (name.replace(" ", "_").replace("=", "").replace("+", "_and_") + suffix) for name in variants}
    missing = [n for n, f in folders.items() if not (f / "manifest.json").is_file()]
    if missing:
        torch.set_num_threads(os.cpu_count() or 1)
        model, tok = assets.load_smollm2()
        for name in missing:
            t0 = time.perf_counter()
            d_kv, latent_cache, quantize, *prefill = variants[name]
            src = model if d_kv is None else mla_pass.convert(model, mla_pass.MLAConfig(d_kv=d_kv, rope_freqs=ROPE_FREQS))
            to_onnx(src, folders[name], tokenizer=tok, latent_cache=latent_cache, quantize=quantize,
                    max_length=max_length, prefill=prefill[0] if prefill else None)
            print(f"exported {name} in {time.perf_counter() - t0:.0f} s → {folders[name]}", file=sys.stderr)
    return folders


# parts of the package that cannot change an exported program (training, evaluation, the command
# line, torch.compile, the model download, the export check, which only accepts or refuses a
# program; of the runtime, all but the manifest the export writes): subpackages by folder,
# modules by file name
NOT_EXPORTED = {"folders": ("quality", "cli", "dynamo"), "files": ("__init__.py", "assets.py", "verify.py"),
                "runtime": ("manifest.py",)}


def source_fingerprint() -> str:
    """Exports are kept per version of the package source: a code change exports afresh."""
    import hashlib
    import importlib
    h = hashlib.sha1()
    for m in ("mla_pass", "mla_pass.export", "mla_pass.runtime"):
        root = Path(importlib.import_module(m).__file__).parent
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root)
            if m == "mla_pass.runtime" and f.name not in NOT_EXPORTED["runtime"]:
                continue
            if f.name not in NOT_EXPORTED["files"] and not (m == "mla_pass" and rel.parts[0] in NOT_EXPORTED["folders"]):
                h.update(f.read_bytes())
    return h.hexdigest()[:10]


def random_cache(rng, shape, dtype: str):
    """Cache contents for timing (values do not change the speed): 8-bit codes or floats."""
    import numpy as np
    if dtype == "int8":
        return rng.integers(-127, 128, shape, dtype=np.int8)
    if dtype == "uint8":                      # the int8 latent cache's codes + 128
        return rng.integers(1, 256, shape, dtype=np.uint8)
    return (rng.standard_normal(shape) * 0.5).astype(dtype)


def worker(folder: str, batch: int, past: int, steps: int, threads: int) -> dict:
    """One (model, batch, past) measurement; runs in its own process."""
    import numpy as np

    from mla_pass.runtime import OnnxEngine

    engine = OnnxEngine(folder, threads=threads)
    m = engine.manifest
    rng = np.random.default_rng(0)
    kv = engine.new_cache(batch, past + steps + 4)
    kv.load([random_cache(rng, e.concrete_shape(batch, past), e.dtype) for e in m.cache], past)
    tokens = rng.integers(0, m.vocab_size, (batch, 1))
    times = []
    for i in range(steps + 2):                         # two warm-up steps
        mask = np.ones((batch, past + i + 1), np.int64)
        t0 = time.perf_counter()
        engine.step(tokens, mask, np.full((batch, 1), past + i), kv)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[2:])
    return {"ms": 1000 * median, "tokens_per_s": batch / median, "kv_bytes_per_token": m.kv_cache_bytes_per_token(),
            "peak_rss_mb": peak_rss_mb()}


def _genai_threads(folder: str, threads: int) -> str:
    """genai runs on one thread unless its config says otherwise: the same threads as ours."""
    config_path = Path(folder) / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {}).update(intra_op_num_threads=threads,
                                                                       inter_op_num_threads=1)
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def genai_worker(folder: str, batch: int, past: int, steps: int, threads: int) -> dict:
    """A yardstick: onnxruntime-genai's own build of the original model (its model builder,
    GroupQueryAttention, cache shared between past and present; fp32 cache in its fp32 and int8
    builds alike), batch 1, same threads."""
    import numpy as np
    import onnxruntime_genai as og

    if batch != 1:
        raise SystemExit("the genai yardstick is measured at batch 1")
    config = json.loads((Path(_genai_threads(folder, threads)) / "genai_config.json").read_text())
    # genai caps the context at max_position_embeddings: stay just inside it at the longest past
    past = min(past, config["model"]["context_length"] - steps - 3)
    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=past + steps + 3, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.random.default_rng(0).integers(100, 40000, past).astype(np.int32))
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[2:])
    layers, kv_heads = config["model"]["decoder"]["num_hidden_layers"], config["model"]["decoder"]["num_key_value_heads"]
    return {"ms": 1000 * median, "tokens_per_s": 1 / median,
            "kv_bytes_per_token": layers * kv_heads * config["model"]["decoder"]["head_size"] * 2 * 4,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space exec() created;
    ru_maxrss also counts the forked parent's high-water mark (e.g. a parent that just exported)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(folder: Path, batch: int, past: int, steps: int, threads: int, genai: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--genai-worker" if genai else "--worker", str(folder), str(batch), str(past),
           str(steps), str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed for {folder} batch {batch} past {past}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    if len({r["past"] for r in rows}) == 1:          # one context length: bars, with each row's range of rounds
        return _plot_bars(rows, path, plt)
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for name in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r["past"], r["ms"]) for r in rows if r["batch"] == b and r["model"] == name)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("past tokens")
        ax.set_ylabel("median decode step (ms)")
        ax.set_title(f"SmolLM2-135M, batch {b}, onnxruntime CPU")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_bars(rows: list[dict], path: Path, plt) -> None:
    """One bar per (model, batch): median ms/step, labelled with the speedup against its genai yardstick."""
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    labels = [f"{r['model']}" + (f" (batch {r['batch']})" if len({x['batch'] for x in rows}) > 1 else "") for r in rows]
    bars = ax.barh(range(len(rows)), [r["ms"] for r in rows],
                   color=["tab:gray" if "genai" in r["model"] else "tab:blue" for r in rows])
    for bar, r in zip(bars, rows):
        ratios = r.get("vs_genai") or []
        note = f"{r['ms']:.1f} ms" + (f", {statistics.median(ratios):.2f}× genai" if ratios else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + note, va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median decode step (ms)")
    ax.set_xlim(0, max(r["ms"] for r in rows) * 1.35)
    ax.set_title(f"SmolLM2-135M decode, past {rows[0]['past']}, onnxruntime CPU")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def paired_ratios(reference: list[dict] | None, results: list[dict]) -> list[float]:
    """reference ms / model ms for each interleaved round (empty without a reference)."""
    if not reference:
        return []
    if len(reference) != len(results):        # a round failed: rounds no longer pair up, compare medians
        return [statistics.median(a["ms"] for a in reference) / statistics.median(b["ms"] for b in results)]
    return [a["ms"] / b["ms"] for a, b in zip(reference, results)]


def format_ratios(ratios: list[float]) -> str:
    """Median of the per-round ratios, with their range when there was more than one round."""
    if not ratios:
        return "—"
    median = f"{statistics.median(ratios):.2f}×"
    return median if len(ratios) == 1 else f"{median} ({min(ratios):.2f}–{max(ratios):.2f})"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--worker", "--genai-worker"):
        folder, batch, past, steps, threads = sys.argv[2], *map(int, sys.argv[3:7])
        run = worker if sys.argv[1] == "--worker" else genai_worker
        print(json.dumps(run(folder, batch, past, steps, threads)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--past", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(VARIANTS))
    parser.add_argument("--exports", type=Path, default=None,
                        help="where the exported folders are kept (default ~/.cache/mla-pass/exports)")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_suffix(".png"))
    parser.add_argument("--genai", type=Path, default=None, help="an onnxruntime-genai build of the original "
                        "(python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p fp32 -e cpu; drop "
                        "'quantization_config' from config.json first): timed at batch 1, the yardstick of "
                        "the fp32-weight rows")
    parser.add_argument("--genai-int8", type=Path, default=None, help="onnxruntime-genai's int8 build of the "
                        "original (the same builder with -p int8): timed at batch 1, the yardstick of the rows "
                        "whose name says 'int8 weights'")
    parser.add_argument("--genai-int4", type=Path, default=None, help="onnxruntime-genai's int4 build of the "
                        "original (-p int4): the yardstick of the rows whose name says 'int4 weights'")
    parser.add_argument("--extra", nargs="+", default=[], metavar="NAME=DIR",
                        help="also time these exported folders (e.g. from benchmarks/quantized.py)")
    parser.add_argument("--repeats", type=int, default=1, help="measure every row this many times, interleaved "
                        "(a shared machine drifts), and report the median")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="instead of decode steps over a random "
                        "cache: an N-token held-out prompt (lcet10.txt) through generate, then 16 new tokens: "
                        "prefill seconds and peak RSS")
    parser.add_argument("--prefill-chunk", type=int, nargs="+", default=None, help="with --prompt-tokens: prompt "
                        "tokens per prefill step, one row per value (0 = the whole prompt in one step; default: "
                        "the runtime's PREFILL_CHUNK)")
    args = parser.parse_args()
    from mla_pass import assets
    cache = args.exports or Path(assets.default_cache_dir()) / "exports"
    # a prompt that fits the model's own context (and genai's cap) shares the decode rows' exports
    fits = args.prompt_tokens is None or args.prompt_tokens + PROMPT_NEW_TOKENS + 1 <= MODEL_CONTEXT
    max_length = None if fits else args.prompt_tokens + PROMPT_NEW_TOKENS + 1
    folders = export_all(cache, {k: VARIANTS[k] for k in args.models}, max_length)
    for spec in args.extra:
        name, _, folder = spec.rpartition("=")
        if not (Path(folder) / "manifest.json").is_file():
            parser.error(f"--extra {spec}: expected NAME=DIR with an exported folder (manifest.json) at DIR")
        folders[name] = Path(folder)
    if args.prompt_tokens is not None:          # benchmarks/prefill.py
        from prefill import long_prompts
        return long_prompts(args, folders)

    rows = []
    print(f"SmolLM2-135M decode step, onnxruntime CPU, {args.threads} threads, median of {args.steps} steps "
          f"(median of {args.repeats} interleaved runs), fp32 unless the name says int8 / int4, cache updated in place")
    yardsticks = {"fp32": GENAI if args.genai else None, "int8": GENAI_INT8 if args.genai_int8 else None,
                  "int4": GENAI_INT4 if args.genai_int4 else None}
    print("| model | batch | past | ms/step | tokens/s | speedup vs original | vs genai of the same weights "
          "(fp32 rows: genai fp32; int8 / int4-weight rows: genai int8 / int4) | KV bytes/token | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        for past in args.past:
            runs = [(name, folder, False) for name, folder in folders.items()]
            if batch == 1:
                runs[:0] = [(n, d, True) for n, d in ((GENAI, args.genai), (GENAI_INT8, args.genai_int8),
                                                      (GENAI_INT4, args.genai_int4)) if d]
            measured: dict[str, list[dict]] = {}
            for _ in range(args.repeats):
                for name, folder, genai in runs:
                    try:
                        measured.setdefault(name, []).append(measure(folder, batch, past, args.steps, args.threads, genai))
                    except RuntimeError as e:
                        if not genai:
                            raise
                        print(f"| {name} | {batch} | {past} | failed: {str(e).splitlines()[-1][:80]} |", flush=True)
            for name, results in measured.items():
                r = dict(results[0], ms=statistics.median(x["ms"] for x in results),
                         peak_rss_mb=max(x["peak_rss_mb"] for x in results))
                r["tokens_per_s"] = batch * 1000 / r["ms"]
                r.update(model=name, batch=batch, past=past)
                # ratios within each interleaved round (the machine drifts between rounds), then their median
                r["vs_original"] = paired_ratios(measured.get("original"), results)
                r["genai_yardstick"] = yardsticks[weight_precision(name)]
                r["vs_genai"] = paired_ratios(measured.get(r["genai_yardstick"]), results)
                rows.append(r)
                speed, vs_genai = format_ratios(r["vs_original"]), format_ratios(r["vs_genai"])
                print(f"| {name} | {batch} | {past} | {r['ms']:.1f} | {r['tokens_per_s']:.1f} | {speed} | {vs_genai} | "
                      f"{r['kv_bytes_per_token']:,} | {r['peak_rss_mb']:.0f} |", flush=True)
    plot(rows, args.plot)
    args.plot.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"\nplot: {args.plot} (numbers, with each round's ratios: {args.plot.with_suffix('.json')})")


if __name__ == "__main__":
    main()
