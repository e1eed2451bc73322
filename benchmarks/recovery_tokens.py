"""Token efficiency of recovery: distillation against MHA2MLA's own fine-tune, from one saved start.

Both objectives run in the same loop (``mla_pass.distill``) on the same training windows (512-token
windows of the training texts, never the held-out one), from the same converted + layer-wise
start (``benchmarks/recovery_start.py``), for the same number of steps and batch:

- ``kl``: the product's distillation (``DistillConfig()``: KL to the original's logits, the latent
  attention weights, AdamW lr 1e-3, warm-up and cosine decay);
- ``ce``: the MHA2MLA recipe (``DistillConfig.mha2mla()``: next-token cross-entropy on the text,
  every weight, AdamW lr 1e-4, β2 0.95, 10% warm-up, constant, 1-sqrt decay over the last 1/6).

At geometrically spaced steps the model is measured on held-out windows of ``lcet10.txt``: KL to
the original, perplexity, top-1 agreement. Each objective writes ``OUT/<objective>.json`` as it
goes (run the two in parallel processes, one thread each); ``--report`` then prints the table,
the tokens each objective needs to reach the KL that CE reaches at its largest token count, and
draws ``OUT/recovery_tokens.png``.

Run: ``python benchmarks/recovery_tokens.py --start DIR --objective kl --out OUT`` (and ``ce``),
then ``python benchmarks/recovery_tokens.py --report --out OUT``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

import mla_pass
from mla_pass import DistillConfig, assets
from mla_pass.quality.evaluate import text_quality
from mla_pass.quality.windows import held_out_windows, training_windows


def configs(steps: int, batch: int) -> dict[str, DistillConfig]:
    return {"kl": DistillConfig(steps=steps, batch_size=batch),
            "ce": DistillConfig.mha2mla(steps=steps, batch_size=batch)}


def eval_steps(steps: int) -> list[int]:
    marks, k = {0, steps}, 1
    while k < steps:
        marks.add(k)
        k *= 2
    return sorted(marks)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok = assets.load_smollm2()
    mla = mla_pass.load(args.start, model)
    train = training_windows(tok, args.train_windows, 512)
    held_out = held_out_windows(tok, args.windows, 512)
    config = configs(args.steps, args.batch)[args.objective]
    marks = set(eval_steps(args.steps))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"objective": args.objective, "config": json.loads(json.dumps(asdict(config))), "start": args.start,
              "train_windows": int(train.shape[0]), "held_out": list(held_out.shape), "threads": args.threads,
              "points": []}

    def measure(step: int, seconds: float) -> None:
        q = text_quality(mla, held_out, reference=model, progress=False)
        record["points"].append({"step": step, "tokens": step * args.batch * 512, "kl": q.kl,
                                 "perplexity": q.perplexity, "agreement": q.agreement, "train_seconds": seconds})
        print(f"{args.objective} step {step:>4} ({step * args.batch * 512:>7,} tokens): KL {q.kl:.3f}  "
              f"ppl {q.perplexity:.1f}  agreement {100 * q.agreement:.1f}%", flush=True)
        tmp = out / f".{args.objective}.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out / f"{args.objective}.json")

    measure(0, 0.0)
    clock = {"train": 0.0, "t": time.perf_counter()}

    def on_step(step: int, loss: float) -> None:
        clock["train"] += time.perf_counter() - clock["t"]
        if step in marks:
            measure(step, clock["train"])
        clock["t"] = time.perf_counter()

    report = mla_pass.distill(mla, model if args.objective == "kl" else None, train, config, progress=False,
                              on_step=on_step)
    record["autocast"], record["losses"] = report.autocast, report.losses
    record["tokens_per_second"] = report.tokens / max(clock["train"], 1e-9)
    if report.steps not in marks:
        measure(report.steps, clock["train"])
    (out / f"{args.objective}.json").write_text(json.dumps(record, indent=1))


def tokens_to_reach(points: list[dict], kl: float) -> float | None:
    """Tokens at which the held-out KL first gets to ``kl`` (linear between measured points)."""
    for a, b in zip(points, points[1:]):
        if b["kl"] <= kl:
            if a["kl"] <= kl:
                return a["tokens"]
            return a["tokens"] + (b["tokens"] - a["tokens"]) * (a["kl"] - kl) / (a["kl"] - b["kl"])
    return points[0]["tokens"] if points and points[0]["kl"] <= kl else None


def report(args) -> None:
    out = Path(args.out)
    runs = {k: json.loads((out / f"{k}.json").read_text()) for k in ("kl", "ce") if (out / f"{k}.json").is_file()}
    if not runs:
        raise SystemExit(f"no results in {out}: run the two objectives first")
    names = {"kl": "distillation (KL, latent weights)", "ce": "MHA2MLA fine-tune (CE, all weights)"}
    lines = ["| objective | steps | tokens | held-out KL | perplexity | top-1 agreement |", "|---|---|---|---|---|---|"]
    for key, r in runs.items():
        for p in r["points"]:
            lines.append(f"| {names[key]} | {p['step']} | {p['tokens']:,} | {p['kl']:.3f} | {p['perplexity']:.1f} | "
                         f"{100 * p['agreement']:.1f}% |")
    if "ce" in runs and "kl" in runs:
        target = runs["ce"]["points"][-1]["kl"]
        ce_tokens = runs["ce"]["points"][-1]["tokens"]
        kl_tokens = tokens_to_reach(runs["kl"]["points"], target)
        reached = (f"distillation reaches it at {kl_tokens:,.0f} tokens ({kl_tokens / ce_tokens:.3f} of CE's)"
                   if kl_tokens is not None else "distillation does not reach it in its run")
        lines += ["", f"CE's held-out KL at its largest token count ({ce_tokens:,}): {target:.3f}; {reached}."]
    for key, r in runs.items():
        lines.append(f"{names[key]}: autocast {r.get('autocast') or 'float32'}, {r['threads']} thread(s), "
                     f"{r.get('tokens_per_second', float('nan')):,.0f} training tokens/s")
    text = "\n".join(lines)
    print(text)
    (out / "recovery_tokens.md").write_text(text + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, r in runs.items():
        pts = [p for p in r["points"] if p["tokens"] > 0]
        start = r["points"][0]
        for ax, metric in zip(axes, ("kl", "perplexity")):
            ax.plot([p["tokens"] for p in pts], [p[metric] for p in pts], marker="o", label=names[key])
            ax.axhline(start[metric], color="grey", lw=0.8, ls=":")
    for ax, label in zip(axes, ("held-out KL to the original (nats)", "held-out perplexity")):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Recovery of SmolLM2-135M at −68.75% KV cache from one start (dotted: the start)")
    fig.tight_layout()
    fig.savefig(out / "recovery_tokens.png", dpi=120)
    print(f"wrote {out / 'recovery_tokens.md'} and {out / 'recovery_tokens.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", help="a converted + layer-wise model folder (benchmarks/recovery_start.py)")
    parser.add_argument("--objective", choices=("kl", "ce"))
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="512-token sequences per step")
    parser.add_argument("--train-windows", type=int, default=None, help="training windows (default: all)")
    parser.add_argument("--windows", type=int, default=4, help="held-out 512-token windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="merge the results in --out into a table and a plot")
    parser.add_argument("--out", default="benchmarks/results/recovery_tokens")
    args = parser.parse_args()
    if args.report:
        report(args)
    elif args.start and args.objective:
        run(args)
    else:
        parser.error("give --start DIR --objective kl|ce to run, or --report")


if __name__ == "__main__":
    main()
