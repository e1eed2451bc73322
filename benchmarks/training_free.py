"""Training-free conversions of the real SmolLM2-135M on real held-out text.

Reproduces the README's results table: perplexity, top-1 agreement and KL to the original on
8 windows × 512 tokens of lcet10.txt (from token 2000); 2-norm calibrates on 16 × 512 tokens of
alice29.txt. Prints a markdown table. Run: ``python benchmarks/training_free.py``.
"""
from __future__ import annotations

import argparse
import time

import torch

import mla_pass
from mla_pass import MLAConfig, assets


def windows(tok, name: str, count: int, length: int, start: int = 0) -> torch.Tensor:
    ids = tok(assets.read_text(name), return_tensors="pt").input_ids[0, start:start + count * length]
    return ids.reshape(count, length)


@torch.no_grad()
def logprobs(fn, ids: torch.Tensor, batch: int = 2) -> torch.Tensor:
    return torch.cat([fn(ids[i:i + batch]).log_softmax(-1) for i in range(0, len(ids), batch)])


def metrics(ref: torch.Tensor, new: torch.Tensor, ids: torch.Tensor) -> tuple[float, float, float]:
    ppl = (-new[:, :-1].gather(-1, ids[:, 1:, None]).mean()).exp().item()
    agree = (ref.argmax(-1) == new.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - new)).sum(-1).mean().item()
    return ppl, agree, kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args()
    model, tok = assets.load_smollm2()
    ids = windows(tok, "lcet10.txt", args.windows, args.length, start=2000)
    calibration = windows(tok, "alice29.txt", 16, 512)
    ref = logprobs(lambda x: model(x).logits, ids)
    rows = [("original", 23040, *metrics(ref, ref, ids), 0.0)]
    recipes = [
        ("exact (full rank, all pairs)", MLAConfig()),   # explicit strategies below: the defaults now use calibration
        ("partial RoPE only, r=4, 2-norm", MLAConfig(rope_freqs=4, rope_strategy="2-norm", activation_aware=False)),
        ("partial RoPE only, r=4, high", MLAConfig(rope_freqs=4, rope_strategy="high", activation_aware=False)),
        ("partial RoPE only, r=16, high", MLAConfig(rope_freqs=16, rope_strategy="high", activation_aware=False)),
        ("MHA2MLA recipe, d_kv=32, r=4", MLAConfig.mha2mla(32, 4)),
        ("MHA2MLA recipe, d_kv=8, r=4", MLAConfig.mha2mla(8, 4)),
        ("2-norm + activation-aware SVD, d_kv=32, r=4", MLAConfig(d_kv=32, rope_freqs=4, rope_strategy="2-norm",
                                                                 activation_aware=True)),
        ("2-norm + activation-aware SVD, d_kv=8, r=4", MLAConfig(d_kv=8, rope_freqs=4, rope_strategy="2-norm",
                                                                activation_aware=True)),
        ("high r=12 + activation-aware SVD, d_kv=16", MLAConfig(d_kv=16, rope_freqs=12, rope_strategy="high",
                                                                activation_aware=True)),
    ]
    for name, cfg in recipes:
        t0 = time.perf_counter()
        mla = mla_pass.convert(model, cfg, calibration=calibration, progress=False)
        new = logprobs(mla, ids)
        rows.append((name, mla.kv_cache_bytes_per_token(torch.float16), *metrics(ref, new, ids),
                     time.perf_counter() - t0))
    print(f"SmolLM2-135M, {args.windows} × {args.length} tokens of lcet10.txt; fp32, CPU\n")
    print("| conversion | KV bytes/token (fp16) | cache kept | perplexity | top-1 agreement | KL to original | convert+eval s |")
    print("|---|---|---|---|---|---|---|")
    for name, size, ppl, agree, kl, secs in rows:
        print(f"| {name} | {size:,} | {100 * size / 23040:.2f}% | {ppl:,.1f} | {100 * agree:.0f}% | {kl:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
