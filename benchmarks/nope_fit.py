"""What replaces a dropped rotary pair's rotation, measured on the real SmolLM2-135M.

For each setting (partial RoPE only at r=4 with the full cache; d_kv=32 and d_kv=8 at r=4 with
activation-aware SVD; the kv_budget equivalents), rows with ``nope_fit`` = none (the raw,
unrotated pair: MHA2MLA's replacement), uniform and attention (a fitted 2×2 map per query head
and pair, ``math.nope_fit``). Held-out windows of ``lcet10.txt`` from token 2000; one calibration
pass on ``alice29.txt`` collects every statistic once. Prints a markdown table.

Run: ``python benchmarks/nope_fit.py --windows 4 --threads 1``
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mla_pass import MLAConfig, assets
from mla_pass.plan.calibrate import collect
from mla_pass.frontend.capture import capture
from mla_pass.quality.windows import calibration_windows, held_out_windows
from mla_pass.quality.evaluate import text_quality
from mla_pass.pipeline import build
from mla_pass.frontend.sites import find_sites

FITS = ("none", "uniform", "attention", "attention-centered")


def settings(names: list[str], strategy: str) -> list[tuple[str, dict]]:
    table = {
        "rope4": ("partial RoPE only, r=4, 100% cache", dict(rope_freqs=4)),
        "d32": ("d_kv=32, r=4 (31.25%)", dict(d_kv=32, rope_freqs=4)),
        "d8": ("d_kv=8, r=4 (12.5%)", dict(d_kv=8, rope_freqs=4)),
        "b32": ("kv_budget=0.3125", dict(kv_budget=0.3125)),
        "b8": ("kv_budget=0.125", dict(kv_budget=0.125)),
    }
    out = []
    for n in names:
        label, kw = table[n]
        if "kv_budget" not in kw:
            kw = {**kw, "rope_strategy": strategy}
        out.append((label + ("" if "kv_budget" in kw else f", {strategy}"), kw))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--settings", default="rope4,d32,d8", help="comma-separated: rope4, d32, d8, b32, b8")
    parser.add_argument("--strategy", default="score-error", help="rope_strategy of the fixed-r settings")
    parser.add_argument("--fits", default=",".join(FITS))
    parser.add_argument("--maps", default="rotation,general", help="forms of the fitted map (nope_map)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stats", default=None, help="file to reuse calibration statistics from (written if "
                        "absent; only for the same model, calibration text and fits)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fits = [f for f in args.fits.split(",") if f]

    model, tok = assets.load_smollm2()
    ids = held_out_windows(tok, args.windows, 512)
    calibration = calibration_windows(tok, args.calibration_windows, 512)
    t0 = time.perf_counter()
    captured = capture(model)
    sites, _ = find_sites(captured)
    weightings = tuple(f for f in fits if f != "none")
    if args.stats and Path(args.stats).exists():
        stats = torch.load(args.stats, weights_only=False)
    else:
        stats = collect(captured.gm, sites, calibration, captured.takes_positions, rope_norms=True, gram=True,
                        score_error=True, nope_moments=weightings)
        if args.stats:
            torch.save(stats, args.stats)
    print(f"calibration ({args.calibration_windows} × 512 tokens, moments {weightings}): "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    maps = [m for m in args.maps.split(",") if m]
    lines = ["| setting | nope_fit | nope_map | perplexity | top-1 agreement | KL to original |",
             "|---|---|---|---|---|---|"]
    for label, kw in settings([s for s in args.settings.split(",") if s], args.strategy):
        for fit, form in [(f, m) for f in fits for m in (maps if f != "none" else ["—"])]:
            t0 = time.perf_counter()
            config = MLAConfig(**kw, nope_fit=fit, **({} if fit == "none" else {"nope_map": form}))
            mla = build(capture(model), config, stats=stats, progress=False)
            q = text_quality(mla, ids, reference=model, progress=False)
            lines.append(f"| {label} | {fit} | {form} | {q.perplexity:,.1f} | {q.agreement:.0%} | {q.kl:.2f} |")
            print(lines[-1], f"({time.perf_counter() - t0:.0f} s; ref ppl {q.reference_perplexity:.1f})", flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
