"""Tiling sweep of the Triton decode kernel on the GPU at hand: which ``DecodeKernelConfig`` is
fastest for each shape, against the default plan (``kernels.decode_attention._plan``).

For each (layer shape, B, T) it times the default and ``--trials`` random configs drawn from
num_splits × block_t × block_h × c_chunk × num_warps × num_stages (configs the GPU cannot run,
e.g. too much shared memory, are counted and skipped), checks every timed config against the
PyTorch reference, and prints the best with its bandwidth (cache bytes read / time) as a fraction
of the GPU's peak. The findings feed the default plan; this script is how they were measured.

Run: ``python benchmarks/gpu_kernel_tune.py [--trials 40] [--json out.json]``. Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_decode import SHAPES, make_inputs, peak_gbps  # noqa: E402

POINTS = [(1, 65536), (16, 16384)]


def candidates(c: int, rng: random.Random, n: int):
    from mla_pass.kernels import DecodeKernelConfig
    seen = set()
    while len(seen) < n:
        cfg = DecodeKernelConfig(num_splits=rng.choice([None, 4, 8, 16, 32, 64, 128]),
                                 block_t=rng.choice([16, 32, 64, 128]),
                                 block_h=rng.choice([None, 16, 32, 64]),
                                 c_chunk=rng.choice([None] + [v for v in (32, 64, 128, 256, 512) if v <= max(32, c)]),
                                 num_warps=rng.choice([2, 4, 8]), num_stages=rng.choice([1, 2, 3, 4]))
        seen.add(cfg)
    return sorted(seen, key=repr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to tune")
        return 0
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    from mla_pass.kernels import DecodeKernelConfig, decode_attention, decode_attention_reference
    from mla_pass.math.attention import latent_query
    name = torch.cuda.get_device_name()
    peak = peak_gbps(name, None)
    rng = random.Random(0)
    results = []
    for s in SHAPES:
        for b, t in POINTS:
            x = make_inputs(s, b, t, torch.bfloat16, "cuda")
            q_lat = latent_query(x["q_nope"], x["up_key"], x["kv"])[:, :, 0].contiguous()
            q_rope = x["q_rope"][:, :, 0].contiguous()
            ref = decode_attention_reference(q_lat[:1], q_rope[:1], x["latent"][:1], x["rope_key"][:1], 0.125)
            nbytes = 2 * b * t * (s.latent + s.rope_width)
            timed, failed = [], 0
            for cfg in [DecodeKernelConfig()] + candidates(s.latent, rng, args.trials):
                def run(cfg=cfg):
                    return decode_attention(q_lat, q_rope, x["latent"], x["rope_key"], 0.125, config=cfg)
                try:
                    out = run()
                    torch.cuda.synchronize()
                except OutOfResources:
                    failed += 1
                    continue
                err = ((out[:1].float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                if err > 2.5e-2:
                    raise SystemExit(f"{s.label()} B={b} T={t} {cfg}: relative error {err:.2e}")
                timed.append((do_bench(run, warmup=10, rep=40), cfg))
            default_ms = timed[0][0] if timed and timed[0][1] == DecodeKernelConfig() else float("nan")
            best_ms, best = min(timed, key=lambda r: r[0])
            row = dict(shape=s.label(), B=b, T=t, default_ms=default_ms, best_ms=best_ms, best=repr(best),
                       default_frac=nbytes / default_ms / 1e6 / peak if peak else None,
                       best_frac=nbytes / best_ms / 1e6 / peak if peak else None, out_of_resources=failed,
                       top5=[(ms, repr(c)) for ms, c in sorted(timed, key=lambda r: r[0])[:5]])
            results.append(row)
            print(f"{row['shape']} B={b} T={t}: default {default_ms * 1e3:.1f} µs "
                  f"({(row['default_frac'] or 0):.0%} of peak), best {best_ms * 1e3:.1f} µs "
                  f"({(row['best_frac'] or 0):.0%}) with {best}; {failed} configs out of resources", flush=True)
            for ms, c in row["top5"][1:]:
                print(f"    {ms * 1e3:.1f} µs {c}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
