"""Quality report on the real SmolLM2-135M: training-free recipes (and recovery) across cache budgets.

For d_kv ∈ {8, 16, 32} per kv head at r = 4 rotary pairs (−87.5 / −81.25 / −68.75% of the KV
cache) and the ``kv_budget`` equivalents, rows: the original; the MHA2MLA recipe (2-norm +
weight-only joint SVD); the project default at the same fixed d_kv and r; the project default
with ``kv_budget`` (rotary pairs and latent width allocated per layer); optionally one of those
after recovery (``mla_pass.recover``: layer-wise, then end-to-end distillation for a CPU-time
budget; time and token count stated). Evaluation: perplexity, top-1 agreement and KL to the
original on held-out windows of ``lcet10.txt`` (from token 2000), optionally also on 2048-token
windows (``--long-windows``) and passkey retrieval at 1k/2k tokens; calibration (once, shared by
all rows) on ``alice29.txt``; distillation on alice29 + asyoulik + plrabn12, never lcet10.
Writes ``<out>/quality.md``, ``<out>/quality.png`` and ``<out>/quality.json`` (the rows);
``--merge A.json B.json ...`` rewrites the table and plot from runs made separately (e.g. one
budget per process).

Run (small setting): ``python benchmarks/quality.py --windows 4``
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mla_pass import DistillConfig, MLAConfig, RecoveryConfig, assets, recover
from mla_pass.calibrate import collect
from mla_pass.capture import capture
from mla_pass.evaluate import (
    PasskeyConfig,
    calibration_windows,
    held_out_windows,
    passkey,
    text_quality,
    training_windows,
)
from mla_pass.pipeline import build, find_sites


@dataclass
class Row:
    recipe: str
    budget: str
    nbytes: int
    kept: float
    perplexity: float
    agreement: float
    kl: float
    seconds: float
    passkey: dict = field(default_factory=dict)
    note: str = ""
    long: dict = field(default_factory=dict)     # perplexity / agreement / kl on the 2048-token windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8, help="held-out windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per held-out window (512 or 2048)")
    parser.add_argument("--calibration-windows", type=int, default=16, help="512-token windows of alice29.txt")
    parser.add_argument("--d-kv", default="8,16,32", help="latent widths per kv head (comma-separated)")
    parser.add_argument("--rope-freqs", type=int, default=4)
    parser.add_argument("--recover-steps", type=int, default=0, help="layer-wise recovery steps per site (0: none)")
    parser.add_argument("--recover-at", default="32", help="d_kv budgets whose model is recovered")
    parser.add_argument("--recover-recipe", default="kv_budget", choices=["kv_budget", "fixed"],
                        help="which project-default model is recovered")
    parser.add_argument("--recover-windows", type=int, default=8, help="calibration windows used for recovery")
    parser.add_argument("--distill-minutes", type=float, default=0.0, help="end-to-end distillation after the "
                        "layer-wise stage, for this many minutes of process CPU time (0: none)")
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--distill-batch", type=int, default=2)
    parser.add_argument("--distill-train", default="latent", choices=["latent", "latent+norms", "all"])
    parser.add_argument("--distill-autocast", default="bfloat16", help="'none' for float32")
    parser.add_argument("--long-windows", type=int, default=0, help="also evaluate on this many 2048-token windows")
    parser.add_argument("--recovered-only", action="store_true", help="only the recovered model's rows (before and "
                        "after recovery; the original's perplexity comes from the same evaluation)")
    parser.add_argument("--merge", nargs="+", default=None, help="quality.json files of earlier runs: write their "
                        "rows as one table and plot (nothing is measured)")
    parser.add_argument("--passkey", action="store_true", help="passkey retrieval at 1k and 2k tokens (slow)")
    parser.add_argument("--ablation", action="store_true", help="also one row per training-free choice at "
                        "31.25%% of the cache (d_kv=32, r=4 and d_kv=16, r=12)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="quality-report", help="folder for quality.md and quality.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return _merge(args.merge, out)
    widths = [int(x) for x in args.d_kv.split(",") if x]
    recover_at = {int(x) for x in args.recover_at.split(",") if x}

    model, tok = assets.load_smollm2()
    ids = held_out_windows(tok, args.windows, args.length)
    long_ids = held_out_windows(tok, args.long_windows, 2048) if args.long_windows else None

    def measure(m, reference=model):
        q = text_quality(m, ids, reference=reference)
        long = {}
        if long_ids is not None:
            ql = text_quality(m, long_ids, reference=reference)
            long = {"perplexity": ql.perplexity, "agreement": ql.agreement if reference is not None else 1.0,
                    "kl": ql.kl if reference is not None else 0.0, "reference_perplexity": ql.reference_perplexity}
        return q, long

    calibration = calibration_windows(tok, args.calibration_windows, 512)
    t0 = time.perf_counter()
    captured = capture(model)
    sites, _ = find_sites(captured)
    stats = collect(captured.gm, sites, calibration, captured.takes_positions, rope_norms=True, gram=True,
                    score_error=True, nope_moments=("attention-centered",))     # what the defaults fit
    calibration_seconds = time.perf_counter() - t0
    per_layer = sites[0].n_kv_heads * (sites[0].head_dim + sites[0].value_dim)
    original_bytes = 2 * sum(s.n_kv_heads * (s.head_dim + s.value_dim) for s in sites)
    pk_config = PasskeyConfig(lengths=(1024, 2048))

    def run_passkey(m) -> dict:
        return passkey(m, tok, pk_config).by_length if args.passkey else {}

    rows = []
    if not args.recovered_only:
        t0 = time.perf_counter()
        base, long = measure(model, None)
        rows.append(Row("original", "—", original_bytes, 1.0, base.perplexity, 1.0, 0.0, time.perf_counter() - t0,
                        run_passkey(model), long=long))
        print(_row_line(rows[-1]), flush=True)
    r = args.rope_freqs
    for d in widths:
        n_kv = sites[0].n_kv_heads
        fraction = n_kv * (d + 2 * r) / per_layer
        label = f"d_kv={d}, r={r} / kv_budget={fraction:g}"
        recipes = [("MHA2MLA (2-norm + weight-only joint SVD)", MLAConfig.mha2mla(d, r)),
                   ("project default, fixed d_kv and r", MLAConfig(d_kv=d, rope_freqs=r)),
                   ("project default, kv_budget (split chosen per layer)", MLAConfig(kv_budget=fraction))]
        if args.recovered_only:
            recipes = [(n, c) for n, c in recipes if n.startswith("project default") and
                       (c.kv_budget is not None) == (args.recover_recipe == "kv_budget")]
        for name, config in recipes:
            t0 = time.perf_counter()
            mla = build(capture(model), config, stats=stats, progress=False)
            q, long = measure(mla)
            rows.append(Row(name, label, mla.kv_cache_bytes_per_token(), mla.kv_cache_bytes_per_token() / original_bytes,
                            q.perplexity, q.agreement, q.kl, time.perf_counter() - t0, run_passkey(mla), long=long))
            print(_row_line(rows[-1]), flush=True)
            if not any(r.recipe == "original" for r in rows):     # from the reference side of that evaluation
                rows.insert(0, Row("original", "—", original_bytes, 1.0, q.reference_perplexity, 1.0, 0.0, 0.0,
                                   long={"perplexity": long["reference_perplexity"], "agreement": 1.0, "kl": 0.0}
                                   if long else {}, note="reference side of the next row's evaluation"))
            chosen = (config.kv_budget is not None) == (args.recover_recipe == "kv_budget")
            if chosen and d in recover_at and (args.recover_steps > 0 or args.distill_minutes > 0):
                rows.append(_recovered(args, mla, model, tok, calibration, label, original_bytes, measure, run_passkey))
                print(_row_line(rows[-1]), flush=True)
    if args.ablation:
        for name, config in _ablation():
            t0 = time.perf_counter()
            mla = build(capture(model), config, stats=stats, progress=False)
            q = text_quality(mla, ids, reference=model)
            rows.append(Row(name, "ablation at 31.25%", mla.kv_cache_bytes_per_token(),
                            mla.kv_cache_bytes_per_token() / original_bytes, q.perplexity, q.agreement, q.kl,
                            time.perf_counter() - t0, run_passkey(mla)))
            print(_row_line(rows[-1]), flush=True)
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    header = (f"SmolLM2-135M-Instruct, fp32, CPU ({args.threads} thread); {args.windows} × {args.length} held-out tokens "
              f"of lcet10.txt from token 2000" + (f" (and {args.long_windows} × 2048)" if args.long_windows else "") +
              f"; calibration {args.calibration_windows} × 512 tokens of alice29.txt "
              f"({calibration_seconds:.0f} s, shared by all rows). Command: `{command}`\n\n")
    (out / "quality.json").write_text(json.dumps({"header": header, "passkey": args.passkey,
                                                  "rows": [asdict(r) for r in rows]}, indent=1))
    _write(rows, header, args.passkey, out)


def _write(rows: list[Row], header: str, with_passkey: bool, out: Path) -> None:
    table = _markdown(rows, with_passkey)
    (out / "quality.md").write_text(header + table)
    original = next(r for r in rows if r.recipe == "original")
    _plot(rows, out / "quality.png", original.perplexity)
    print("\n" + header + table)
    print(f"wrote {out / 'quality.md'} and {out / 'quality.png'}")


def _merge(paths: list[str], out: Path) -> None:
    """One table from several runs: the first run's original row, then every other row by budget."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows, seen = [], set()
    for run in runs:
        for r in run["rows"]:
            row = Row(**{k: ({int(n): v for n, v in r[k].items()} if k == "passkey" else v) for k, v in r.items()})
            key = (row.recipe, row.budget)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    rows = rows[:1] + sorted(rows[1:], key=lambda r: (r.kept, 0 if "recovery" not in r.recipe else 1))
    header = "".join(run["header"] for run in runs)
    _write(rows, header, any(run["passkey"] for run in runs), out)


def _recovered(args, mla, model, tok, calibration, label, original_bytes, measure, run_passkey) -> Row:
    """``mla`` after layer-wise recovery and distillation, with the time and tokens it took."""
    tokens = calibration[: args.recover_windows]
    distill_config, train = None, None
    if args.distill_minutes > 0:
        train = training_windows(tok, None, 512)
        distill_config = DistillConfig(steps=None, lr=args.distill_lr, batch_size=args.distill_batch,
                                       train=args.distill_train,
                                       autocast=None if args.distill_autocast == "none" else args.distill_autocast)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    layer_wise = recover(mla, model, tokens, RecoveryConfig(steps=args.recover_steps))
    report = None
    if distill_config is not None:
        from mla_pass import distill
        report = distill(mla, model, train, distill_config, max_seconds=60 * args.distill_minutes, clock="cpu")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    q, long = measure(mla)
    stages = [f"layer-wise {args.recover_steps} steps/site"] if args.recover_steps else []
    n_tokens = tokens.numel() if args.recover_steps else 0
    if report is not None:
        stages.append(f"distillation {report.steps} steps ({args.distill_train}, lr {args.distill_lr:g}, "
                      f"{args.distill_autocast})")
        n_tokens += report.tokens
        print(f"distillation KL on training text: first 10 steps {sum(report.losses[:10]) / max(len(report.losses[:10]), 1):.3f}, "
              f"last 10 {report.mean_loss(10):.3f}", flush=True)
    del layer_wise
    return Row("project default after recovery", label, mla.kv_cache_bytes_per_token(),
               mla.kv_cache_bytes_per_token() / original_bytes, q.perplexity, q.agreement, q.kl, wall, run_passkey(mla),
               note=f"{args.recover_recipe} model; {' + '.join(stages)}: {cpu / 60:.0f} CPU-min ({wall / 60:.0f} "
                    f"wall-min) on {n_tokens:,} tokens", long=long)


def _ablation() -> list[tuple[str, MLAConfig]]:
    """What each training-free choice buys at one cache size (120 values per token and layer)."""
    aware = dict(activation_aware=True)
    return [
        ("MHA2MLA d_kv=32, r=4 + least-squares refit", MLAConfig(d_kv=32, rope_freqs=4, rope_strategy="2-norm",
                                                                  activation_aware=False, refit=True)),
        ("2-norm + activation-aware SVD, d_kv=32, r=4", MLAConfig(d_kv=32, rope_freqs=4, rope_strategy="2-norm",
                                                                  **aware)),
        ("score-error + activation-aware SVD, d_kv=32, r=4", MLAConfig(d_kv=32, rope_freqs=4,
                                                                       rope_strategy="score-error", **aware)),
        ("the same + least-squares refit", MLAConfig(d_kv=32, rope_freqs=4, rope_strategy="score-error", refit=True,
                                                     **aware)),
        ("high + activation-aware SVD, d_kv=16, r=12", MLAConfig(d_kv=16, rope_freqs=12, rope_strategy="high",
                                                                 **aware)),
        ("score-error + activation-aware SVD, d_kv=16, r=12", MLAConfig(d_kv=16, rope_freqs=12,
                                                                        rope_strategy="score-error", **aware)),
    ]


def _row_line(row: Row) -> str:
    long = (f" | @2048 ppl {row.long['perplexity']:.1f} agree {row.long['agreement']:.3f} KL {row.long['kl']:.3f}"
            if row.long else "")
    return (f"{row.budget:>24} | {row.recipe:<44} | ppl {row.perplexity:10.1f} | agree {row.agreement:.3f} | "
            f"KL {row.kl:.3f}{long} | {row.seconds:.0f} s")


def _markdown(rows: list[Row], with_passkey: bool) -> str:
    head = "| budget | recipe | KV bytes/token (fp16) | cache kept | perplexity | top-1 agreement | KL to original |"
    with_long = any(r.long for r in rows)
    if with_long:
        head += " ppl @2048 | agreement @2048 | KL @2048 |"
    if with_passkey:
        head += " passkey 1k | passkey 2k |"
    head += " time |"
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in rows:
        line = (f"| {r.budget} | {r.recipe} | {r.nbytes:,} | {100 * r.kept:.2f}% | {r.perplexity:,.1f} | "
                f"{100 * r.agreement:.0f}% | {r.kl:.2f} |")
        if with_long:
            line += (f" {r.long['perplexity']:,.1f} | {100 * r.long['agreement']:.0f}% | {r.long['kl']:.2f} |"
                     if r.long else " | | |")
        if with_passkey:
            line += "".join(f" {100 * r.passkey.get(n, float('nan')):.0f}% |" for n in (1024, 2048))
        line += f" {r.note or f'{r.seconds:.0f} s'} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _plot(rows: list[Row], path: Path, original_ppl: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    recipes = list(dict.fromkeys(r.recipe for r in rows if r.recipe != "original"))
    for name in recipes:
        pts = sorted((r.kept, r.kl, r.perplexity) for r in rows if r.recipe == name)
        xs = [100 * p[0] for p in pts]
        ax_kl.plot(xs, [p[1] for p in pts], marker="o", label=name)
        ax_ppl.plot(xs, [p[2] for p in pts], marker="o", label=name)
    ax_ppl.axhline(original_ppl, color="black", linestyle="--", linewidth=1, label="original")
    for ax, what in ((ax_kl, "KL to original (nats/token)"), (ax_ppl, "perplexity")):
        ax.set_xlabel("KV cache kept (%)")
        ax.set_ylabel(what)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_kl.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: quality vs cache kept (held-out lcet10.txt)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
