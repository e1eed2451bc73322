"""Quality report on the real SmolLM2-135M: training-free recipes (and recovery) across cache budgets.

For d_kv ∈ {8, 16, 32} per kv head at r = 4 rotary pairs (−87.5 / −81.25 / −68.75% of the KV
cache) and the ``kv_budget`` equivalents, rows: the original; the MHA2MLA recipe (2-norm +
weight-only joint SVD); the project default at the same fixed d_kv and r; the project default
with ``kv_budget`` (rotary pairs and latent width allocated per layer); optionally that model
after layer-wise recovery (``mla_pass.recover``, CPU time and token count stated). Evaluation:
perplexity, top-1 agreement and KL to the original on held-out windows of ``lcet10.txt`` (from
token 2000), optionally passkey retrieval at 1k/2k tokens; calibration (once, shared by all rows)
on ``alice29.txt``. Writes ``<out>/quality.md`` and ``<out>/quality.png``.

Run (small setting): ``python benchmarks/quality.py --windows 4``
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mla_pass import MLAConfig, RecoveryConfig, assets, recover
from mla_pass.calibrate import collect
from mla_pass.capture import capture
from mla_pass.evaluate import (PasskeyConfig, calibration_windows, held_out_windows, passkey, text_quality)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8, help="held-out windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per held-out window (512 or 2048)")
    parser.add_argument("--calibration-windows", type=int, default=16, help="512-token windows of alice29.txt")
    parser.add_argument("--d-kv", default="8,16,32", help="latent widths per kv head (comma-separated)")
    parser.add_argument("--rope-freqs", type=int, default=4)
    parser.add_argument("--recover-steps", type=int, default=0, help="layer-wise recovery steps per site (0: none)")
    parser.add_argument("--recover-at", default="32", help="d_kv budgets whose kv_budget model is recovered")
    parser.add_argument("--recover-windows", type=int, default=8, help="calibration windows used for recovery")
    parser.add_argument("--passkey", action="store_true", help="passkey retrieval at 1k and 2k tokens (slow)")
    parser.add_argument("--ablation", action="store_true", help="also one row per training-free choice at "
                        "31.25%% of the cache (d_kv=32, r=4 and d_kv=16, r=12)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="quality-report", help="folder for quality.md and quality.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    widths = [int(x) for x in args.d_kv.split(",") if x]
    recover_at = {int(x) for x in args.recover_at.split(",") if x}

    model, tok = assets.load_smollm2()
    ids = held_out_windows(tok, args.windows, args.length)
    calibration = calibration_windows(tok, args.calibration_windows, 512)
    t0 = time.perf_counter()
    captured = capture(model)
    sites, _ = find_sites(captured)
    stats = collect(captured.gm, sites, calibration, captured.takes_positions, rope_norms=True, gram=True,
                    score_error=True)
    calibration_seconds = time.perf_counter() - t0
    per_layer = sites[0].n_kv_heads * (sites[0].head_dim + sites[0].value_dim)
    original_bytes = 2 * sum(s.n_kv_heads * (s.head_dim + s.value_dim) for s in sites)
    pk_config = PasskeyConfig(lengths=(1024, 2048))

    def run_passkey(m) -> dict:
        return passkey(m, tok, pk_config).by_length if args.passkey else {}

    t0 = time.perf_counter()
    base = text_quality(model, ids)
    rows = [Row("original", "—", original_bytes, 1.0, base.perplexity, 1.0, 0.0, time.perf_counter() - t0,
                run_passkey(model))]
    print(_row_line(rows[-1]), flush=True)
    r = args.rope_freqs
    for d in widths:
        n_kv = sites[0].n_kv_heads
        fraction = n_kv * (d + 2 * r) / per_layer
        label = f"d_kv={d}, r={r} / kv_budget={fraction:g}"
        recipes = [("MHA2MLA (2-norm + weight-only joint SVD)", MLAConfig.mha2mla(d, r)),
                   ("project default, fixed d_kv and r", MLAConfig(d_kv=d, rope_freqs=r)),
                   ("project default, kv_budget (split chosen per layer)", MLAConfig(kv_budget=fraction))]
        for name, config in recipes:
            t0 = time.perf_counter()
            mla = build(capture(model), config, stats=stats, progress=False)
            q = text_quality(mla, ids, reference=model)
            rows.append(Row(name, label, mla.kv_cache_bytes_per_token(), mla.kv_cache_bytes_per_token() / original_bytes,
                            q.perplexity, q.agreement, q.kl, time.perf_counter() - t0, run_passkey(mla)))
            print(_row_line(rows[-1]), flush=True)
            if config.kv_budget is not None and d in recover_at and args.recover_steps > 0:
                tokens = calibration[: args.recover_windows]
                t0 = time.perf_counter()
                recover(mla, model, tokens, RecoveryConfig(steps=args.recover_steps))
                seconds = time.perf_counter() - t0
                q = text_quality(mla, ids, reference=model)
                rows.append(Row(f"kv_budget + layer-wise recovery ({args.recover_steps} steps/site)", label,
                                mla.kv_cache_bytes_per_token(), mla.kv_cache_bytes_per_token() / original_bytes,
                                q.perplexity, q.agreement, q.kl, seconds, run_passkey(mla),
                                note=f"{seconds / 60:.1f} CPU-min on {tokens.numel():,} tokens"))
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
              f"of lcet10.txt from token 2000; calibration {args.calibration_windows} × 512 tokens of alice29.txt "
              f"({calibration_seconds:.0f} s, shared by all rows). Command: `{command}`\n\n")
    table = _markdown(rows, args.passkey)
    (out / "quality.md").write_text(header + table)
    _plot(rows, out / "quality.png", base.perplexity)
    print("\n" + header + table)
    print(f"wrote {out / 'quality.md'} and {out / 'quality.png'}")


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
    return (f"{row.budget:>24} | {row.recipe:<44} | ppl {row.perplexity:10.1f} | agree {row.agreement:.3f} | "
            f"KL {row.kl:.3f} | {row.seconds:.0f} s")


def _markdown(rows: list[Row], with_passkey: bool) -> str:
    head = "| budget | recipe | KV bytes/token (fp16) | cache kept | perplexity | top-1 agreement | KL to original |"
    if with_passkey:
        head += " passkey 1k | passkey 2k |"
    head += " time |"
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in rows:
        line = (f"| {r.budget} | {r.recipe} | {r.nbytes:,} | {100 * r.kept:.2f}% | {r.perplexity:,.1f} | "
                f"{100 * r.agreement:.0f}% | {r.kl:.2f} |")
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
