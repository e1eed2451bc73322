"""Layer-by-layer reconstruction on the real SmolLM2-135M: quality before and after.

Converts with activation-aware SVD (default: high r=12, d_kv=16, 31.25% of the cache), runs
``mla_pass.recover`` on 8 × 512 tokens of alice29.txt and evaluates on 8 × 512 tokens of
lcet10.txt (from token 2000). Prints a markdown table. Run: ``python benchmarks/recovery.py``.
"""
from __future__ import annotations

import argparse
import time

import torch

import mla_pass
from mla_pass import MLAConfig, RecoveryConfig, assets
from training_free import logprobs, metrics, windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-kv", type=int, default=16)
    parser.add_argument("--rope-freqs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--sequential", action="store_true", help="inputs from the converted model so far")
    args = parser.parse_args()
    model, tok = assets.load_smollm2()
    ids = windows(tok, "lcet10.txt", 8, 512, start=2000)
    calibration = windows(tok, "alice29.txt", 16, 512)
    ref = logprobs(lambda x: model(x).logits, ids)
    config = MLAConfig(d_kv=args.d_kv, rope_freqs=args.rope_freqs, rope_strategy="high", activation_aware=True)
    mla = mla_pass.convert(model, config, calibration=calibration, progress=False)
    before = metrics(ref, logprobs(mla, ids), ids)
    t0 = time.perf_counter()
    report = mla_pass.recover(mla, model, calibration[:8], RecoveryConfig(steps=args.steps, sequential=args.sequential))
    seconds = time.perf_counter() - t0
    after = metrics(ref, logprobs(mla, ids), ids)
    size = mla.kv_cache_bytes_per_token(torch.float16)
    print(f"{config}; KV {size:,} bytes/token (fp16); site output error (relative MSE) "
          f"{report.mean('loss_before'):.3f} → {report.mean('loss_after'):.3f} in {seconds:.0f} s\n")
    print("| stage | perplexity | top-1 agreement | KL to original |")
    print("|---|---|---|---|")
    label = "+ sequential layer-wise reconstruction" if args.sequential else "+ layer-wise reconstruction"
    for name, (ppl, agree, kl) in (("training-free", before), (label, after)):
        print(f"| {name} | {ppl:,.1f} | {100 * agree:.0f}% | {kl:.2f} |")


if __name__ == "__main__":
    main()
