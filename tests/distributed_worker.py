"""One rank of a data-parallel distillation run on the tiny Llama (run by torchrun from test_distributed.py).

Every rank builds the same model, tokens and config (``setup``); rank 0 writes the losses and the
trained weights to OUT. ``--die-at K`` makes rank 1 SIGKILL itself right after step K, as a lost
machine would; ``--hang-at K`` makes it stop answering instead (the others' collectives time out
after ``--timeout`` seconds).
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_llama  # noqa: E402

import mla_pass  # noqa: E402
from mla_pass import DistillConfig, MLAConfig  # noqa: E402
from mla_pass.quality import distributed  # noqa: E402

CONFIGS = {"kl": DistillConfig(steps=8, lr=3e-3, batch_size=4, warmup_steps=2, autocast=None, train="latent+norms"),
           "ce": DistillConfig.mha2mla(steps=8, batch_size=4, autocast=None)}


def setup(objective: str = "kl"):
    """The teacher, the converted student, the training tokens and the config: the same in every process."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=1), progress=False)
    tokens = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(0))
    return model, mla, tokens, CONFIGS[objective]


def trained(mla) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in mla.program.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--parallel", default="ddp")
    parser.add_argument("--objective", default="kl")
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = distributed.join("cpu", timeout_s=args.timeout)
    model, mla, tokens, config = setup(args.objective)

    def on_step(step, loss):
        if world.rank == 1 and step == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if world.rank == 1 and step == args.hang_at:
            time.sleep(3600)

    out = Path(args.out)
    report = mla_pass.distill(mla, model, tokens, config, checkpoint=out / "checkpoint", checkpoint_every=2,
                              progress=False, parallel=args.parallel, on_step=on_step)
    if world.main:
        from safetensors.torch import save_file
        save_file(trained(mla), str(out / "weights.safetensors"))
        (out / "report.json").write_text(json.dumps({"losses": report.losses, "processes": report.processes,
                                                     "tokens": report.tokens}))
    distributed.leave()


if __name__ == "__main__":
    main()
