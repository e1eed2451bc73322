"""The quality commands of the CLI: ``mla-pass eval`` and ``mla-pass recover``.

``eval MODEL`` measures perplexity on held-out windows (and, for a converted model whose original
can be found, top-1 agreement and KL to it), optionally passkey retrieval at 1k and 2k tokens.
``recover MLA_DIR --out DIR`` refits each converted site to the original's attention outputs on
calibration text, checkpointing after every site (safetensors + JSON, no pickle), then distils
the whole model to the original's logits on training text (``--distill-steps``), checkpointing
every few steps, so that a run cut short by ``--minutes`` continues with ``--resume`` to the same
result as an uninterrupted one. ``--objective ce`` trains by next-token cross-entropy instead
(``--recipe mha2mla``: the MHA2MLA paper's fine-tune). ``--nproc N`` runs it on N processes
(torchrun's launcher, gloo on CPU, NCCL on CUDA): sites are shared out, distillation batches are
split, rank 0 writes; a checkpoint resumes with any ``--nproc``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .common import check_range

CHECKPOINT_WEIGHTS = "recovery.safetensors"
CHECKPOINT_STATE = "recovery.json"


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, agreement/KL to the original, passkey retrieval")
    p.add_argument("model", help="'smollm2-135m', a Hugging Face model folder, or a saved mla-pass folder")
    p.add_argument("--windows", type=int, default=8, help="held-out windows of lcet10.txt (from token 2000)")
    p.add_argument("--length", type=int, default=512, help="tokens per window (512 or 2048 for the report)")
    p.add_argument("--passkey", action="store_true", help="also passkey retrieval at 1k and 2k tokens")
    p.add_argument("--original", default=None, help="the model a converted folder came from (default: the "
                   "source folder recorded at conversion, when it still exists)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("recover", help="recover a converted model's quality: layer-wise refit, then distillation "
                       "to the original's logits")
    p.add_argument("mla_dir", help="a folder saved by mla-pass convert / mla.save")
    p.add_argument("--out", required=True, help="where the recovered model and its checkpoint go")
    p.add_argument("--steps", type=int, default=150, help="layer-wise Adam steps per site (0: skip that stage)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this long (between sites or steps); "
                   "continue later with --resume")
    p.add_argument("--distill-steps", type=int, default=100, help="end-to-end distillation steps (0: none)")
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--distill-batch", type=int, default=2, help="sequences per distillation step (all processes "
                   "together: a multiple of --nproc)")
    p.add_argument("--distill-windows", type=int, default=None, help="training windows (default: all of "
                   "alice29.txt + asyoulik.txt + plrabn12.txt, never the evaluation text)")
    p.add_argument("--distill-length", type=int, default=512, help="tokens per training window")
    p.add_argument("--distill-text", default="real", choices=["real", "generated", "mix"],
                   help="training text: the books (real), the original model's own samples (generated, cached "
                   "under the cache folder; its time counts against --minutes) or both interleaved (mix)")
    p.add_argument("--generated-tokens", type=int, default=100_000, help="tokens of generated text "
                   "(--distill-text generated|mix)")
    p.add_argument("--train", default="latent", choices=["latent", "latent+norms", "all"],
                   help="which weights distillation moves (default: the converted attention's)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--objective", default="kl", choices=["kl", "ce"], help="kl: distil the original's "
                   "next-token distributions; ce: next-token cross-entropy on the text (the MHA2MLA fine-tune)")
    p.add_argument("--recipe", default=None, choices=["mha2mla"], help="mha2mla: the paper's fine-tune (ce, all "
                   "weights, lr 1e-4, betas 0.9/0.95, warm-up, 1-sqrt decay) over --distill-steps; overrides "
                   "--objective, --train and --distill-lr")
    p.add_argument("--autocast", default="auto", choices=["auto", "bfloat16", "float16", "none"],
                   help="forward passes' dtype (weights stay float32); auto: bf16 on CUDA and on CPUs whose bf16 "
                   "matmul measures faster, else float32")
    p.add_argument("--nproc", type=int, default=1, help="processes to run on (data-parallel; on CUDA one GPU each)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--windows", type=int, default=8, help="calibration windows of alice29.txt")
    p.add_argument("--length", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--sequential", action="store_true", help="each site learns from the converted model's own "
                   "inputs (earlier sites already refitted)")
    p.add_argument("--original", default=None, help="the model MLA_DIR was converted from (default: the "
                   "source folder recorded at conversion)")
    p.set_defaults(func=cmd_recover)


# -- loading ------------------------------------------------------------------------------------
def _is_converted(path: Path) -> bool:
    from ..persist import CONFIG_FILE
    return (path / CONFIG_FILE).is_file()


def _load_original(mla, override: str | None, cache_dir):
    """(model, tokenizer) of the model ``mla`` came from, or (None, None) if it cannot be found."""
    from .common import load_source

    if override:
        return load_source(override, cache_dir)
    folder = (mla.source.get("config") or {}).get("_name_or_path") or ""
    if mla.source.get("kind") == "transformers" and folder and (Path(folder) / "config.json").is_file():
        return load_source(folder, cache_dir)
    return None, None


def _tokenizer(folder: Path, fallback):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:    # no tokenizer files saved with the model: use the original's
        return fallback


def _load_pair(spec: str, original_spec: str | None, cache_dir):
    """(model, tokenizer, original or None) for eval: a converted folder is compared with its original."""
    from ..model import MLAModel
    from .common import load_source

    model, tok = load_source(spec, cache_dir)
    original = None
    if isinstance(model, MLAModel):
        original, original_tok = _load_original(model, original_spec, cache_dir)
        tok = _tokenizer(Path(spec), original_tok)
    elif original_spec:
        original, _ = load_source(original_spec, cache_dir)
    if tok is None:
        raise SystemExit(f"error: no tokenizer for {spec}: save the tokenizer files in the model folder")
    return model, tok, original


# -- eval ---------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from ..inspect import kv_cache_bytes_per_token
    from ..model import MLAModel
    from ..quality.evaluate import text_quality
    from ..quality.passkey import PasskeyConfig, passkey
    from ..quality.windows import held_out_windows

    check_range("--windows", args.windows, 1)
    check_range("--length", args.length, 2)
    model, tok, original = _load_pair(args.model, args.original, args.cache_dir)
    converted = isinstance(model, MLAModel)
    if converted and original is None:
        print("note: the original model was not found (pass --original PATH); no agreement or KL")
    ids = held_out_windows(tok, args.windows, args.length, args.cache_dir)
    print(f"evaluating on {args.windows} × {args.length} tokens of lcet10.txt (from token 2000)")
    q = text_quality(model, ids, reference=original)
    rows = []
    if original is not None:
        rows.append(["original", model.original_kv_cache_bytes_per_token(), q.reference_perplexity, 1.0, 0.0,
                     original])
    nbytes = model.kv_cache_bytes_per_token() if converted else kv_cache_bytes_per_token(model)
    rows.append(["converted" if converted else "model", nbytes, q.perplexity, q.agreement, q.kl, model])
    lengths = (1024, 2048)
    if args.passkey:
        for row in rows:
            result = passkey(row[-1], tok, PasskeyConfig(lengths=lengths), cache_dir=args.cache_dir)
            row.append(result.by_length)
    head = "| model | KV bytes/token (fp16) | perplexity | top-1 agreement | KL to original |"
    head += "".join(f" passkey {n // 1024}k |" for n in lengths) if args.passkey else ""
    print(head)
    print("|---" * head.count(" |") + "|")
    for name, nbytes, ppl, agree, kl, _m, *pk in rows:
        line = f"| {name} | {nbytes:,} | {ppl:,.2f} | {_pct(agree)} | {'' if kl is None else f'{kl:.3f}'} |"
        if pk:
            line += "".join(f" {_pct(pk[0][n])} |" for n in lengths)
        print(line)
    print(f"({q.seconds:.0f} s)")
    return 0


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


# -- recover ------------------------------------------------------------------------------------
def cmd_recover(args) -> int:
    import torch
    from safetensors.torch import load_file

    from ..persist import check_save_folder, finish_pair, save_model, write_pair
    from ..pipeline import load
    from ..quality.distillation import CHECKPOINT_STATE as DISTILL_STATE
    from ..quality.distillation import CHECKPOINT_WEIGHTS as DISTILL_WEIGHTS
    from ..quality import distributed
    from ..quality.distillation import DistillConfig, distill
    from ..quality.recovery import RecoveryConfig, recover
    from ..quality.windows import calibration_windows, training_windows
    from ..rewrite import MODULES

    for flag, value, low in (("--nproc", args.nproc, 1), ("--windows", args.windows, 1),
                             ("--length", args.length, 2), ("--minutes", args.minutes, 0),
                             ("--distill-batch", args.distill_batch, 1), ("--distill-windows", args.distill_windows, 1),
                             ("--distill-length", args.distill_length, 2)):
        check_range(flag, value, low)
    check_range("--distill-lr", args.distill_lr, 0, above=True)
    check_range("--temperature", args.temperature, 0, above=True)
    src = Path(args.mla_dir)
    if not _is_converted(src):
        raise SystemExit(f"error: {src} is not a converted model (no mla_config.json): recovery refits a converted "
                         f"model to its original; run `mla-pass convert MODEL --out DIR` first and recover DIR")
    if args.steps < 0 or args.distill_steps < 0:
        raise SystemExit("error: --steps and --distill-steps must be >= 0")
    if args.nproc > 1 and args.sequential and args.steps:
        raise SystemExit("error: --sequential feeds each site the sites before it and runs on one process: drop "
                         "--sequential or --nproc")
    if args.distill_steps and args.distill_batch % args.nproc:
        raise SystemExit(f"error: --distill-batch {args.distill_batch} does not split over --nproc {args.nproc}: "
                         f"make it a multiple of {args.nproc}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available; use --device cpu")
    out = Path(args.out)
    state_path, weights_path = out / CHECKPOINT_STATE, out / CHECKPOINT_WEIGHTS
    settings = {"source": str(src.resolve()), "steps": args.steps, "seed": args.seed, "windows": args.windows,
                "length": args.length, "sequential": args.sequential}
    distill_config = None
    if args.distill_steps:
        autocast = None if args.autocast == "none" else args.autocast
        if args.recipe == "mha2mla":
            distill_config = DistillConfig.mha2mla(steps=args.distill_steps, batch_size=args.distill_batch,
                                                   seed=args.seed, autocast=autocast)
        else:
            distill_config = DistillConfig(steps=args.distill_steps, lr=args.distill_lr, batch_size=args.distill_batch,
                                           objective=args.objective, temperature=args.temperature, train=args.train,
                                           seed=args.seed, autocast=autocast)
        settings.update(distill_steps=args.distill_steps, distill_windows=args.distill_windows,
                        distill_length=args.distill_length)     # the rest is checked by the distillation checkpoint
        if args.distill_text != "real":
            settings.update(distill_text=args.distill_text, generated_tokens=args.generated_tokens)
    if args.distill_text != "real" and args.generated_tokens < 1:
        raise SystemExit(f"error: --generated-tokens must be >= 1 with --distill-text {args.distill_text}, got "
                         f"{args.generated_tokens}")
    generated = None
    if args.distill_text != "real":        # checked before any heavy work; short windows keep a short prompt
        from ..quality.selfgen import SelfGenConfig
        try:
            generated = SelfGenConfig(tokens=args.generated_tokens, length=args.distill_length, seed=args.seed,
                                      prefix=min(SelfGenConfig.prefix, max(args.distill_length // 4, 1)))
        except ValueError as e:
            raise SystemExit(f"error: --distill-text {args.distill_text}: {e} (see --distill-length)") from None
    state = {"settings": settings, "done": [], "losses": {}, "seconds": 0.0, "complete": False}
    finish_pair(weights_path, state_path)   # a checkpoint write cut short: finish or undo it
    if args.resume:                       # settle the checkpoint before any heavy loading
        if not state_path.is_file():
            raise SystemExit(f"error: --resume: {state_path} does not exist; start without --resume")
        state = json.loads(state_path.read_text())
        if state.get("settings") != settings:
            raise SystemExit(f"error: the checkpoint in {out} was made with {state.get('settings')}, not "
                             f"{settings}; resume with the same options or choose another --out")
        if state.get("complete"):
            print(f"{out} is already fully recovered")
            return 0
    elif state_path.is_file():
        raise SystemExit(f"error: {out} already holds a recovery checkpoint; pass --resume to continue it or choose "
                         "another --out")
    check_save_folder(out, own=(CHECKPOINT_STATE,))   # where the result goes, checked before any work
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, out)
    world = distributed.join(device)
    main = world.main                     # only rank 0 prints and writes
    def windows(tok):             # checked before the models load when the folder has its tokenizer
        return (calibration_windows(tok, args.windows, args.length, args.cache_dir),
                training_windows(tok, args.distill_windows, args.distill_length, args.cache_dir)
                if distill_config and args.distill_text != "generated" else None)

    tok = _tokenizer(src, None)
    tokens, train_tokens = windows(tok) if tok is not None else (None, None)
    mla = load(src)
    original, original_tok = _load_original(mla, args.original, args.cache_dir)
    if original is None:
        raise SystemExit(f"error: the original model of {src} (recorded source "
                         f"{(mla.source.get('config') or {}).get('_name_or_path')!r}) cannot be found; "
                         "pass --original PATH (or 'smollm2-135m')")
    if tok is None:
        if original_tok is None:
            raise SystemExit(f"error: no tokenizer for {src}: save the tokenizer files in the model folder")
        tok = original_tok
        tokens, train_tokens = windows(tok)
    state["tokens"] = int(tokens.numel())
    if device == "cuda" and world.size > 1:
        device = f"cuda:{torch.cuda.current_device()}"       # join() gave each rank its own GPU
    if args.resume and weights_path.is_file():
        saved = load_file(str(weights_path))
        params = mla.program.state_dict()
        bad = [k for k, v in saved.items() if k not in params or params[k].shape != v.shape]
        if bad:
            raise SystemExit(f"error: {weights_path} does not fit {src} ({bad[:3]}); choose another --out")
        mla.program.load_state_dict(saved, strict=False)
    mla.to(device)
    original.to(device)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seconds_before = state["seconds"]
    budget = None if args.minutes is None else 60 * args.minutes

    def save_state():
        state["seconds"] = seconds_before + time.perf_counter() - t0
        if main:
            _atomic(state_path, lambda tmp: tmp.write_text(json.dumps(state, indent=2)))

    def checkpoint(index, result):          # weights and state as one pair: never one without the other
        weights = {k: v.detach().contiguous().cpu() for k, v in mla.program.state_dict().items()
                   if k.startswith(MODULES + ".")}
        state["done"].append(index)
        state["losses"][str(index)] = [result.loss_before, result.loss_after]
        state["seconds"] = seconds_before + time.perf_counter() - t0
        if main:
            state["weights_sha256"] = write_pair(weights_path, weights, state_path,
                                                 {k: v for k, v in state.items() if k != "weights_sha256"})

    torch.manual_seed(args.seed)
    n_sites = len(mla.plans)
    if args.steps and len(state["done"]) < n_sites:
        config = RecoveryConfig(steps=args.steps, seed=args.seed, sequential=args.sequential)
        report = recover(mla, original, tokens, config, skip_sites=state["done"], max_seconds=budget,
                         on_site_done=checkpoint, progress=main)
        if report.remaining:
            distributed.barrier(world)
            if main:
                    print(f"stopped at the time limit after {len(state['done'])}/{n_sites} sites "
                      f"({state['seconds']:.0f} s); continue with: mla-pass recover {src} --out {out} --resume "
                      "(same options)")
            return 0
    losses = state["losses"].values()
    before = sum(v[0] for v in losses) / max(len(losses), 1)
    after = sum(v[1] for v in losses) / max(len(losses), 1)
    summary = (f"layer-wise: {n_sites} sites, site output error (relative MSE) {before:.3f} → {after:.3f}"
               if args.steps else "layer-wise: skipped")
    if distill_config is not None:
        gen = None
        if args.distill_text != "real":             # sampled once, cached; a resumed run reads the cache
            from ..quality.selfgen import distillation_text
            if not main:
                distributed.barrier(world)           # rank 0 samples and caches first; the others read its cache
            train_tokens, gen = distillation_text(args.distill_text, original, tok, length=args.distill_length,
                                                  real_windows=args.distill_windows, generated=generated,
                                                  cache_dir=args.cache_dir)
            if main:
                distributed.barrier(world)
        left = None if budget is None else max(budget - (time.perf_counter() - t0), 0.0)   # 0: one step
        d = distill(mla, original if distill_config.objective == "kl" else None, train_tokens, distill_config,
                    max_seconds=left, checkpoint=out, progress=main)
        save_state()
        if not d.complete:
            if not main:
                return 0
            print(f"stopped at the time limit after {d.steps}/{d.total_steps} distillation steps "
                  f"({state['seconds']:.0f} s); continue with: mla-pass recover {src} --out {out} --resume "
                  "(same options)")
            return 0
        first, last = sum(d.losses[:10]) / len(d.losses[:10]), d.mean_loss(10)
        if gen is not None:
            summary += (f"; generation: {gen.tokens.shape[0]} windows, {gen.sampled_tokens:,} tokens sampled from the "
                        f"original, {gen.cpu_seconds / 60:.1f} CPU-min" + ("" if gen.generated_now else " (cached)"))
        on = "" if args.distill_text == "real" else f" on {args.distill_text} text"
        stage, loss = ("distillation", "KL") if distill_config.objective == "kl" else ("fine-tune", "cross-entropy")
        summary += (f"; {stage}{on}: {d.steps} steps on {d.tokens:,} "
                    f"training tokens, {loss} {first:.3f} → {last:.3f} (training text, first/last 10 steps), "
                    f"{d.cpu_seconds / 60:.1f} CPU-min, autocast {d.autocast or 'float32'}"
                    + (f", {d.processes} processes" if d.processes > 1 else ""))
    if not main:
        distributed.barrier(world)         # rank 0 saves
        return 0
    save_model(mla.to("cpu"), out, own=(CHECKPOINT_STATE,))      # beside its own checkpoint
    tok.save_pretrained(str(out))
    state["complete"] = True
    save_state()
    for name in (CHECKPOINT_WEIGHTS, DISTILL_WEIGHTS, DISTILL_STATE):    # the full model is saved now
        (out / name).unlink(missing_ok=True)
    print(f"recovered {n_sites} sites in {state['seconds']:.0f} s ({summary}; layer-wise on {state['tokens']:,} "
          f"tokens of alice29.txt); saved to {out}")
    distributed.barrier(world)
    return 0


def _launch(args, out: Path) -> int:
    """Run this same command on ``--nproc`` processes (torchrun's launcher); one line if a process fails."""
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    print(f"recovering on {args.nproc} processes", flush=True)
    try:
        elastic_launch(config, sys.executable)("-m", "mla_pass.cli", *args.argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        resume = " --resume" if "--resume" not in args.argv else ""
        raise SystemExit(f"error: recovery process {rank} of {args.nproc} stopped ({how}); the checkpoint in {out} "
                         f"keeps the finished sites and steps: continue with `mla-pass {' '.join(args.argv)}{resume}` "
                         "(any --nproc)") from None
    return 0


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
