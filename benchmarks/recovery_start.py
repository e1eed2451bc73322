"""A shared starting point for recovery runs: convert SmolLM2-135M at a budget, refit layer-wise, save.

The same steps as ``benchmarks/quality.py --recovered-only`` up to the layer-wise stage
(calibration 16 × 512 tokens of ``alice29.txt`` shared by the defaults' fits, ``kv_budget``
conversion, layer-wise recovery on the first ``--recover-windows`` calibration windows), then the
model is saved as an mla-pass folder (``mla.save``) with ``start.json``: the CPU and wall time of
calibration + conversion and of the layer-wise stage, the tokens it saw, and the held-out quality
before and after it (``--windows`` × 512 and ``--long-windows`` × 2048 of ``lcet10.txt``). Later
runs (``benchmarks/quality.py --start DIR``) continue from the folder, so no one pays calibration
and the layer-wise stage twice.

Run: ``python benchmarks/recovery_start.py --kv-budget 0.3125 --out DIR``
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mla_pass import MLAConfig, RecoveryConfig, assets, recover
from mla_pass.plan.calibrate import collect
from mla_pass.frontend.capture import capture
from mla_pass.quality.windows import calibration_windows, held_out_windows
from mla_pass.quality.evaluate import text_quality
from mla_pass.pipeline import build
from mla_pass.frontend.sites import find_sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-budget", type=float, default=0.3125)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--recover-steps", type=int, default=100, help="layer-wise Adam steps per site")
    parser.add_argument("--recover-windows", type=int, default=8)
    parser.add_argument("--windows", type=int, default=4, help="held-out 512-token windows (0: no evaluation)")
    parser.add_argument("--long-windows", type=int, default=1, help="held-out 2048-token windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model, tok = assets.load_smollm2()
    info: dict = {"kv_budget": args.kv_budget, "calibration_windows": args.calibration_windows,
                  "recover_steps": args.recover_steps, "recover_windows": args.recover_windows,
                  "threads": args.threads}

    def measure(m) -> dict:
        result = {}
        for key, n, length in (("short", args.windows, 512), ("long", args.long_windows, 2048)):
            if n:
                q = text_quality(m, held_out_windows(tok, n, length), reference=model)
                result[key] = {"windows": n, "length": length, "perplexity": q.perplexity, "agreement": q.agreement,
                               "kl": q.kl, "reference_perplexity": q.reference_perplexity}
        return result

    wall0, cpu0 = time.perf_counter(), time.process_time()
    calibration = calibration_windows(tok, args.calibration_windows, 512)
    captured = capture(model)
    sites, _ = find_sites(captured)
    config = MLAConfig(kv_budget=args.kv_budget)
    fit = config.resolved(True).nope_fit
    stats = collect(captured.gm, sites, calibration, captured.takes_positions, rope_norms=True, gram=True,
                    score_error=True, nope_moments=(fit,) if fit != "none" else ())     # what the defaults fit
    mla = build(capture(model), config, stats=stats, progress=False)
    info["convert"] = {"cpu_seconds": time.process_time() - cpu0, "wall_seconds": time.perf_counter() - wall0}
    info["training_free"] = measure(mla)
    print("training-free:", json.dumps(info["training_free"]), flush=True)

    tokens = calibration[: args.recover_windows]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    report = recover(mla, model, tokens, RecoveryConfig(steps=args.recover_steps))
    info["layer_wise"] = {"cpu_seconds": time.process_time() - cpu0, "wall_seconds": time.perf_counter() - wall0,
                          "tokens": int(tokens.numel()), "steps_per_site": args.recover_steps,
                          "sites": len(mla.plans)}
    del report
    info["after_layer_wise"] = measure(mla)
    print("after layer-wise:", json.dumps(info["after_layer_wise"]), flush=True)
    mla.save(out)
    tok.save_pretrained(str(out))
    (out / "start.json").write_text(json.dumps(info, indent=1))
    print(f"saved to {out}: layer-wise {info['layer_wise']['cpu_seconds'] / 60:.1f} CPU-min on "
          f"{info['layer_wise']['tokens']:,} tokens", flush=True)


if __name__ == "__main__":
    main()
