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
from mla_pass.plan.calibrate import collect
from mla_pass.frontend.capture import capture
from mla_pass.quality.distillation import CHECKPOINT_STATE
from mla_pass.quality.passkey import PasskeyConfig, passkey
from mla_pass.quality.windows import calibration_windows, held_out_windows
from mla_pass.quality.evaluate import text_quality
from mla_pass.pipeline import build
from mla_pass.frontend.sites import find_sites


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
    parser.add_argument("--distill-text", default="real", choices=["real", "generated", "mix"],
                        help="distillation text: the three books, the original's own samples "
                        "(mla_pass.quality.selfgen), or both interleaved")
    parser.add_argument("--generated-tokens", type=int, default=100_000, help="tokens of self-generated text "
                        "(--distill-text generated|mix; cached, its CPU time counts as recovery)")
    parser.add_argument("--generated-prompts", default="mix", choices=["books", "chat", "mix"])
    parser.add_argument("--recovery-cpu-minutes", type=float, default=None, help="instead of --distill-minutes: "
                        "ALL recovery CPU time (layer-wise + generation + distillation); distillation gets the rest")
    parser.add_argument("--checkpoint", default=None, help="distillation checkpoint folder (a rerun with the same "
                        "options resumes from it)")
    parser.add_argument("--start", default=None, help="a folder from benchmarks/recovery_start.py (converted and "
                        "refitted layer-wise): recover from it instead of converting (implies --recovered-only)")
    parser.add_argument("--long-windows", type=int, default=0, help="also evaluate on this many 2048-token windows")
    parser.add_argument("--recovered-only", action="store_true", help="only the recovered model's rows (before and "
                        "after recovery; the original's perplexity comes from the same evaluation)")
    parser.add_argument("--merge", nargs="+", default=None, help="quality.json files of earlier runs: write their "
                        "rows as one table and plot (nothing is measured)")
    parser.add_argument("--passkey", action="store_true", help="passkey retrieval at 1k and 2k tokens (slow)")
    parser.add_argument("--probe", action="store_true", help="also the rope part alone at full-rank latent: per-kv-head "
                        "pairs vs shared mixed slots at several cache sizes")
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
    if args.start:
        return _from_start(args, out)
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
                   ("per-kv-head pairs + fitted map (the default before shared slots)",
                    MLAConfig(d_kv=d, rope_freqs=r, rope_mix="none")),
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
    if args.probe:
        for name, config in _probe(r):
            t0 = time.perf_counter()
            mla = build(capture(model), config, stats=stats, progress=False)
            q = text_quality(mla, ids, reference=model)
            rows.append(Row(name, "rope only (full-rank latent)", mla.kv_cache_bytes_per_token(),
                            mla.kv_cache_bytes_per_token() / original_bytes, q.perplexity, q.agreement, q.kl,
                            time.perf_counter() - t0))
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
    wall0, cpu0 = time.perf_counter(), time.process_time()
    layer_wise = recover(mla, model, tokens, RecoveryConfig(steps=args.recover_steps))
    lw_cpu, lw_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    del layer_wise
    stages = [f"layer-wise {args.recover_steps} steps/site"] if args.recover_steps else []
    n_tokens = tokens.numel() if args.recover_steps else 0
    d = _distill_stage(args, mla, model, tok, lw_cpu)
    q, long = measure(mla)
    return Row("project default after recovery", label, mla.kv_cache_bytes_per_token(),
               mla.kv_cache_bytes_per_token() / original_bytes, q.perplexity, q.agreement, q.kl,
               lw_wall + d["wall"], run_passkey(mla),
               note=_recovery_note(args.recover_recipe + " model", stages + d["stages"], lw_cpu + d["cpu"],
                                   lw_wall + d["wall"], n_tokens + d["tokens"]), long=long)


def _recovery_note(what: str, stages: list[str], cpu: float, wall: float, tokens: int) -> str:
    return f"{what}; {' + '.join(stages)}: {cpu / 60:.0f} CPU-min ({wall / 60:.0f} wall-min) on {tokens:,} tokens"


def _distill_stage(args, mla, model, tok, prior_cpu: float) -> dict:
    """Distillation after the layer-wise stage (``prior_cpu`` CPU-seconds spent already): the
    training text (self-generated windows are made first; their CPU time counts), then
    ``distill`` for ``--distill-minutes`` of CPU time, or for what is left of
    ``--recovery-cpu-minutes``. Returns the stage descriptions, CPU/wall seconds and tokens."""
    from mla_pass import distill
    from mla_pass.quality.selfgen import SelfGenConfig, distillation_text

    result = {"stages": [], "cpu": 0.0, "wall": 0.0, "tokens": 0, "report": None, "generated": None}
    if args.distill_minutes <= 0 and args.recovery_cpu_minutes is None:
        return result
    gen_config = SelfGenConfig(tokens=args.generated_tokens, length=512, prompts=args.generated_prompts)
    train, gen = distillation_text(args.distill_text, model, tok, length=512, generated=gen_config)
    if gen is not None:
        result["stages"].append(f"generation of {gen.tokens.shape[0]} × 512 windows ({gen.sampled_tokens:,} sampled "
                                f"tokens, {args.generated_prompts} prompts{', cached' if not gen.generated_now else ''})")
        result["cpu"] += gen.cpu_seconds
        result["wall"] += gen.wall_seconds
        result["generated"] = {"windows": gen.tokens.shape[0], "sampled_tokens": gen.sampled_tokens,
                               "cpu_seconds": gen.cpu_seconds, "wall_seconds": gen.wall_seconds,
                               "generated_now": gen.generated_now, "path": str(gen.path)}
        print(f"self-generated text: {gen.tokens.shape[0]} windows, {gen.sampled_tokens:,} sampled tokens, "
              f"{gen.cpu_seconds / 60:.1f} CPU-min ({gen.generated_now} windows sampled now)", flush=True)
    if args.recovery_cpu_minutes is not None:
        budget = 60 * args.recovery_cpu_minutes - prior_cpu - result["cpu"]
        if budget <= 0:
            raise SystemExit(f"error: --recovery-cpu-minutes {args.recovery_cpu_minutes:g} is used up before "
                             f"distillation ({(prior_cpu + result['cpu']) / 60:.1f} CPU-min): raise it or generate less")
    else:
        budget = 60 * args.distill_minutes
    print(f"distillation on {args.distill_text} text ({train.shape[0]} × {train.shape[1]} tokens) for "
          f"{budget / 60:.1f} CPU-min", flush=True)
    config = DistillConfig(steps=None, lr=args.distill_lr, batch_size=args.distill_batch, train=args.distill_train,
                           autocast=None if args.distill_autocast == "none" else args.distill_autocast)
    spent = 0.0              # a resumed run: the checkpoint's CPU time counts against the same budget
    state = Path(args.checkpoint or "") / CHECKPOINT_STATE
    if args.checkpoint and state.is_file():
        spent = json.loads(state.read_text())["cpu_seconds"]
        print(f"resuming distillation from {args.checkpoint} ({spent / 60:.1f} CPU-min done)", flush=True)
    report = distill(mla, model, train, config, max_seconds=max(budget - spent, 1.0), clock="cpu",
                     checkpoint=args.checkpoint, checkpoint_every=5)     # a stopped run loses at most 5 steps
    if not report.complete:         # the budget ran out before the planned schedule did (slower steps later)
        print(f"note: the CPU budget ran out after {report.steps}/{report.total_steps} distillation steps", flush=True)
    first = sum(report.losses[:10]) / max(len(report.losses[:10]), 1)
    print(f"distillation KL on training text: first 10 steps {first:.3f}, last 10 {report.mean_loss(10):.3f}",
          flush=True)
    result["stages"].append(f"distillation {report.steps} steps on {args.distill_text} text ({args.distill_train}, "
                            f"lr {args.distill_lr:g}, {args.distill_autocast})")
    result["cpu"] += report.cpu_seconds
    result["wall"] += report.seconds
    result["tokens"] = report.tokens
    result["report"] = report
    return result


def _from_start(args, out: Path) -> None:
    """Recover from a saved start (``benchmarks/recovery_start.py``): distillation only, then the
    rows: original, training-free and after layer-wise (measured when the start was made, on the
    same windows), after recovery (measured now)."""
    from mla_pass import load

    start = Path(args.start)
    info = json.loads((start / "start.json").read_text())
    model, tok = assets.load_smollm2()
    mla = load(start)
    ids = held_out_windows(tok, args.windows, args.length)
    long_ids = held_out_windows(tok, args.long_windows, 2048) if args.long_windows else None
    d = _distill_stage(args, mla, model, tok, info["layer_wise"]["cpu_seconds"])
    t0 = time.perf_counter()
    q = text_quality(mla, ids, reference=model)
    ql = text_quality(mla, long_ids, reference=model) if long_ids is not None else None
    eval_seconds = time.perf_counter() - t0
    original_bytes = mla.original_kv_cache_bytes_per_token()
    site = next(iter(mla.plans.values()))
    width = round(info["kv_budget"] * original_bytes / 2 / len(mla.plans) / site.n_kv_heads) - 2 * args.rope_freqs
    label = f"d_kv={width}, r={args.rope_freqs} / kv_budget={info['kv_budget']:g}"
    nbytes = mla.kv_cache_bytes_per_token()

    def long_of(m: dict) -> dict:
        return {"perplexity": m["perplexity"], "agreement": m["agreement"], "kl": m["kl"]} if m else {}

    rows = [Row("original", "—", original_bytes, 1.0, q.reference_perplexity, 1.0, 0.0, 0.0,
                long={"perplexity": ql.reference_perplexity, "agreement": 1.0, "kl": 0.0} if ql else {},
                note="reference side of the last row's evaluation")]
    same = (info["training_free"].get("short", {}).get("windows") == args.windows and args.length == 512 and
            info["training_free"].get("long", {}).get("windows", 0) == args.long_windows)
    lw = info["layer_wise"]
    if same:        # measured by recovery_start.py on the same windows
        for recipe, key, note in (
                ("project default, kv_budget (split chosen per layer)", "training_free",
                 f"calibration + conversion {info['convert']['cpu_seconds'] / 60:.0f} CPU-min (not recovery)"),
                (f"kv_budget + layer-wise recovery ({lw['steps_per_site']} steps/site)", "after_layer_wise",
                 _recovery_note("the start", [f"layer-wise {lw['steps_per_site']} steps/site"], lw["cpu_seconds"],
                                lw["wall_seconds"], lw["tokens"]))):
            m = info[key]
            rows.append(Row(recipe, label, nbytes, nbytes / original_bytes, m["short"]["perplexity"],
                            m["short"]["agreement"], m["short"]["kl"], 0.0, note=note, long=long_of(m.get("long"))))
    else:
        print("note: the start was evaluated on other windows: its training-free and layer-wise rows are left out")
    long = ({"perplexity": ql.perplexity, "agreement": ql.agreement, "kl": ql.kl} if ql else {})
    rows.append(Row("project default after recovery", label, nbytes, nbytes / original_bytes, q.perplexity,
                    q.agreement, q.kl, eval_seconds,
                    note=_recovery_note(f"from {start.name}", [f"layer-wise {lw['steps_per_site']} steps/site"] +
                                        d["stages"], lw["cpu_seconds"] + d["cpu"], lw["wall_seconds"] + d["wall"],
                                        lw["tokens"] + d["tokens"]), long=long))
    for row in rows:
        print(_row_line(row), flush=True)
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    header = (f"SmolLM2-135M-Instruct, fp32, CPU ({args.threads} thread); {args.windows} × {args.length} held-out tokens "
              f"of lcet10.txt from token 2000" + (f" (and {args.long_windows} × 2048)" if args.long_windows else "") +
              f"; start `{start}` made by `benchmarks/recovery_start.py` (calibration {info['calibration_windows']} × "
              f"512 tokens of alice29.txt, layer-wise on {lw['tokens']:,} tokens). Command: `{command}`\n\n")
    report = d["report"]
    extra = {"start": info, "generated": d["generated"],
             "distill": None if report is None else {"steps": report.steps, "tokens": report.tokens,
                                                     "cpu_seconds": report.cpu_seconds, "seconds": report.seconds,
                                                     "losses": report.losses}}
    (out / "quality.json").write_text(json.dumps({"header": header, "passkey": False,
                                                  "rows": [asdict(r) for r in rows], **extra}, indent=1))
    _write(rows, header, False, out)


def _probe(r: int) -> list[tuple[str, MLAConfig]]:
    """The rope part's loss alone (latent at full rank, so it is exact): MHA2MLA-style pairs per kv
    head against shared slots mixed across kv heads, at 2·Hkv·r values and half and double that."""
    unmixed = dict(rope_mix="none", nope_fit="none")
    return [
        (f"{r} fastest pairs per kv head", MLAConfig(rope_freqs=r, rope_strategy="high", **unmixed)),
        (f"best {r} pairs per kv head by score error", MLAConfig(rope_freqs=r, rope_strategy="score-error", **unmixed)),
        ("the same + fitted map", MLAConfig(rope_freqs=r, rope_strategy="score-error", rope_mix="none")),
        (f"mixed slots, best {r // 2 * 3}", MLAConfig(rope_freqs=r // 2, rope_mix="pca")),
        (f"mixed slots, best {r * 3}", MLAConfig(rope_freqs=r, rope_mix="pca")),
        (f"mixed slots, best {r * 6}", MLAConfig(rope_freqs=2 * r, rope_mix="pca")),
        (f"{2 * r} fastest pairs per kv head", MLAConfig(rope_freqs=2 * r, rope_strategy="high", **unmixed)),
    ]


def _ablation() -> list[tuple[str, MLAConfig]]:
    """What each training-free choice buys at one cache size (120 values per token and layer)."""
    aware = dict(activation_aware=True, rope_mix="none")
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
        ("mixed slots (pca), d_kv=32, 12 slots", MLAConfig(d_kv=32, rope_freqs=4, activation_aware=True)),
        ("mixed slots (pca), d_kv=28, 18 slots", MLAConfig(d_kv=28, rope_freqs=6, activation_aware=True)),
        ("mixed slots (pca), d_kv=24, 24 slots", MLAConfig(d_kv=24, rope_freqs=8, activation_aware=True)),
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
