"""Distillation on one process and on two (DDP and FSDP2 over gloo): step time, memory, same losses.

Each configuration runs the same steps of ``mla_pass.distill`` from one saved start
(``benchmarks/recovery_start.py``) on the same global batch: one process with 2 threads, then
``torchrun --nproc_per_node 2`` with 1 thread per rank, ``parallel="ddp"`` and ``"fsdp"``. Each
rank reports its median step time (steps after the first two), its peak RSS and the losses; the
table compares them (losses as the largest relative difference to the one-process run). On a
2-core CPU two processes cannot beat one process with two threads by much: this measures that
the engine works at full size and what it costs, not a speed-up.

Run: ``python benchmarks/distributed_recovery.py --start-dir DIR [--steps 6] [--batch 4]``
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

import torch


def worker(args) -> None:
    import mla_pass
    from mla_pass import DistillConfig, assets
    from mla_pass.quality import distributed
    from mla_pass.quality.windows import training_windows

    world = distributed.join("cpu")
    torch.set_num_threads(args.threads)
    model, tok = assets.load_smollm2()
    mla = mla_pass.load(args.start, model)
    train = training_windows(tok, 32, 512)
    stamps = [time.perf_counter()]
    report = mla_pass.distill(mla, model, train, DistillConfig(steps=args.steps, batch_size=args.batch, autocast=None),
                              progress=False, parallel=args.parallel,
                              on_step=lambda step, loss: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps, stamps[1:])][2:]
    record = {"rank": world.rank, "processes": world.size, "parallel": args.parallel if world.size > 1 else "-",
              "threads": args.threads, "median_step_s": statistics.median(steps),
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "losses": report.losses}
    out = Path(args.out)
    (out / f"{record['parallel']}-{world.rank}.json").write_text(json.dumps(record))
    distributed.leave()


def launch(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__).resolve()), "--worker", "--start-dir", args.start, "--steps", str(args.steps),
          "--batch", str(args.batch), "--out", str(out)]
    runs = [[sys.executable, *me, "--threads", "2"]]
    for parallel in ("ddp", "fsdp"):
        runs.append([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *me,
                     "--threads", "1", "--parallel", parallel])
    for cmd in runs:
        print("running:", " ".join(cmd[1:]), flush=True)
        threads = "1" if "--parallel" in cmd else "2"
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*-*.json"))]
    base = next(r for r in records if r["processes"] == 1)
    lines = ["| processes | parallel | threads each | rank | median step (s) | vs one process | peak RSS (GB) | "
             "max loss rel. diff |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["processes"], r["parallel"], r["rank"])):
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
        lines.append(f"| {r['processes']} | {r['parallel']} | {r['threads']} | {r['rank']} | "
                     f"{r['median_step_s']:.2f} | {base['median_step_s'] / r['median_step_s']:.2f}× | "
                     f"{r['peak_rss_gb']:.2f} | {diff:.1e} |")
    text = "\n".join(lines) + (f"\n\n{args.steps} steps of {args.batch} × 512 tokens (KL distillation, latent weights, "
                               "float32), SmolLM2-135M from the −68.75% start; gloo, this machine's CPU.\n")
    print(text)
    (out / "distributed_recovery.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start-dir", dest="start", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/distributed_recovery")
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
