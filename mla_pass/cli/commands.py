"""Command line: ``mla-pass inspect | convert | export | generate | eval | recover | demo``."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..export.staging import request_stop
from .common import DEFAULT_MODEL, check_range, load_source


def cmd_inspect(args) -> int:
    import torch

    from ..frontend.sites import kv_bytes_per_token
    from ..inspect import format_table, inspect_model
    model, _ = load_source(args.model, args.cache_dir)
    rows = inspect_model(model)
    print(format_table(rows))
    ok = [r for r in rows if r.index >= 0]
    total = kv_bytes_per_token(ok, original=True)
    print(f"\n{len(ok)} attention sites; original KV cache {total:,} bytes/token in fp16 "
          f"({kv_bytes_per_token(ok, torch.float32, original=True):,} in fp32)")
    converted = [r for r in ok if r.converted_values_per_token is not None]
    if converted:
        mla_total = kv_bytes_per_token(converted)
        print(f"converted cache {mla_total:,} bytes/token ({100 * (1 - mla_total / total):.2f}% smaller)")
    refused = [r for r in rows if r.index < 0]
    for r in refused:
        print(f"not convertible: {r.layer}: {r.note}")
    return 0


def _config_from_args(args):
    from ..config import MLAConfig
    return MLAConfig(d_kv=args.d_kv, rope_freqs=args.rope_freqs, rope_strategy=args.rope_strategy,
                     svd=args.svd, activation_aware=args.activation_aware, best_effort=args.best_effort,
                     kv_budget=args.kv_budget, refit=args.refit, nope_fit=args.nope_fit,
                     rope_mix=args.rope_mix, max_rope_width=args.max_rope_width)


def _calibration_tokens(tokenizer, cache_dir, windows: int = 8, length: int = 512):
    from ..quality.windows import calibration_windows
    if tokenizer is None:
        raise SystemExit("error: calibration needs the model's tokenizer files in the model folder")
    return calibration_windows(tokenizer, windows, length, cache_dir)   # a clear error if the text is too short


def _auto_calibration(config, tokenizer, cache_dir):
    """Calibration tokens when the config needs them (an error without a tokenizer), or would use
    them (only if a tokenizer is there); else None."""
    if config.needs_calibration or (config.benefits_from_calibration and tokenizer is not None):
        return _calibration_tokens(tokenizer, cache_dir)
    return None


def cmd_convert(args) -> int:
    from ..inspect import format_table
    from ..persist import check_save_folder
    from ..pipeline import convert
    check_save_folder(args.out)                  # the options and the folder before any work
    config = _config_from_args(args)
    model, tok = load_source(args.model, args.cache_dir)
    calib = _auto_calibration(config, tok, args.cache_dir)
    t0 = time.perf_counter()
    mla = convert(model, config, calibration=calib)
    print(format_table(mla.report))
    before, after = mla.original_kv_cache_bytes_per_token(), mla.kv_cache_bytes_per_token()
    print(f"\nconverted in {time.perf_counter() - t0:.1f} s; KV cache {before:,} → {after:,} bytes/token "
          f"in fp16 ({100 * (1 - after / before):.2f}% smaller)")
    out = mla.save(args.out)
    if tok is not None:
        tok.save_pretrained(str(out))
    print(f"saved to {out}")
    return 0


def cmd_export(args) -> int:
    """Convert (or load a converted folder) and write an ONNX folder for the runtime, or a
    checkpoint folder for vLLM (``--format vllm``)."""
    from ..export.onnx import to_onnx
    from ..export.staging import check_destination
    from ..model import MLAModel
    from ..pipeline import convert
    check_destination(args.out)                  # the options and the folder before any work
    if args.format == "vllm":
        if args.original:
            raise ValueError("--format vllm serves converted models; vLLM loads the original folder as it is")
        onnx_only = {"--quantize": args.quantize, "--latent-cache": args.latent_cache != "float" or None,
                     "--target": args.target != "onnxruntime" or None, "--max-length": args.max_length,
                     "--cache-update": args.cache_update != "in_place" or None, "--prefill-form": args.prefill_form}
        given = [flag for flag, value in onnx_only.items() if value]
        if given:
            raise ValueError(f"{', '.join(given)} belong to the ONNX export; vLLM manages its own cache "
                             "(its --kv-cache-dtype quantizes it)")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2 (prompt + generated tokens), got {args.max_length}")
    config = None if args.original else _config_from_args(args)
    source, tok = load_source(args.model, args.cache_dir)
    if tok is None and Path(args.model, "tokenizer.json").is_file():
        tok = str(Path(args.model, "tokenizer.json"))
    t0 = time.perf_counter()
    if args.original:
        if isinstance(source, MLAModel):
            raise SystemExit("error: --original needs the unconverted model, not a converted folder")
        program, what = source, "original (key/value cache)"
    elif isinstance(source, MLAModel):
        program = source
    else:
        calib = _auto_calibration(config, None if isinstance(tok, str) else tok, args.cache_dir)   # as convert does
        program = convert(source, config, calibration=calib)
    if isinstance(program, MLAModel):
        what = f"converted ({program.config})"          # the config that ran, automatic choices made
    if args.format == "vllm":
        return _export_vllm(program, args, tok, what, t0)
    out = to_onnx(program, args.out, dtype=args.dtype, tokenizer=tok, max_length=args.max_length,
                  cache_update=args.cache_update, quantize=args.quantize,
                  latent_cache=args.latent_cache, target=args.target,
                  prefill=args.prefill_form)
    from ..runtime.manifest import Manifest
    manifest = Manifest.read(out)
    print(f"exported {what} in {time.perf_counter() - t0:.0f} s to {out}: {len(manifest.cache)} cache tensors, "
          f"{manifest.kv_cache_bytes_per_token():,} KV bytes/token ({manifest.dtype}), cache {manifest.cache_update}")
    print(f"run it: mla-pass generate {out} --prompt \"...\"")
    return 0


def _export_vllm(program, args, tok, what: str, t0: float) -> int:
    import json

    from ..export.vllm import to_vllm
    out = to_vllm(program, args.out, layout=args.vllm_layout, dtype=args.dtype,
                  tokenizer=tok)
    info = json.loads((out / "config.json").read_text())["mla_pass"]
    print(f"exported {what} in {time.perf_counter() - t0:.0f} s to {out} for vLLM: layout {info['layout']} "
          f"({info['cache_values_per_token_per_layer']} cached values per token per layer, "
          f"{info['cache_bytes_per_token']:,} bytes/token; original K/V {info['original_cache_values_per_token']:,} "
          f"values/token)")
    print(f"serve it (in the vLLM venv, scripts/setup_vllm.sh): vllm serve {out}")
    return 0


def cmd_demo(args) -> int:
    """Fetch the embedded default model, show its sites, prove the full-rank rewrite exact on
    real text, convert at a budget, recover briefly (layer-wise, then distillation to the
    original's logits) and compare cache size, quality and a sample generation before and after."""
    import torch

    from .. import assets
    from ..config import MLAConfig
    from ..inspect import format_table
    from ..pipeline import convert
    from ..quality.distillation import DistillConfig, distill
    from ..quality.evaluate import text_quality
    from ..quality.recovery import RecoveryConfig, recover
    from ..quality.windows import held_out_windows, training_windows

    for flag, value, least in (("--tokens", args.tokens, 2), ("--recover-minutes", args.recover_minutes, 0),
                               ("--recover-steps", args.recover_steps, 0)):
        check_range(flag, value, least)
    config = _config_from_args(args)                 # checked before the download
    t_start = time.perf_counter()
    print(f"fetching {DEFAULT_MODEL} and text into {args.cache_dir or assets.default_cache_dir()} (once)")
    model, tok = assets.load_smollm2(args.cache_dir)
    ids = held_out_windows(tok, 1, args.tokens, args.cache_dir)
    prompt = tok(args.prompt, return_tensors="pt").input_ids

    t0 = time.perf_counter()
    _step("1/4 converting at full rank, every rotary pair kept (the exactness check)")
    exact = convert(model, MLAConfig())
    print(format_table(exact.report))
    _step(f"    comparing logits on {ids.shape[1]} held-out tokens, then 32 greedy tokens")
    with torch.no_grad():
        diff = (exact(ids) - model(ids).logits).abs().max().item()
    same = torch.equal(exact.generate(prompt, max_new_tokens=32), model.generate(prompt, max_new_tokens=32, do_sample=False))
    print(f"\nfull rank, all rotary pairs ({time.perf_counter() - t0:.0f} s): max |Δlogits| = {diff:.2e} on "
          f"{ids.shape[1]} tokens of lcet10.txt; 32 greedy tokens identical: {same}")
    del exact

    calib = _auto_calibration(config, tok, args.cache_dir)
    _step("2/4 converting at the requested budget" + (f" (calibrated on {calib.shape[0]} × {calib.shape[1]} tokens)"
                                                     if calib is not None else ""))
    mla = convert(model, config, calibration=calib)
    print(f"converted: {mla.config}")                 # the config that ran, automatic choices made

    def sample(m) -> str:
        out = m.generate(prompt, max_new_tokens=24) if m is mla else m.generate(prompt, max_new_tokens=24,
                                                                                do_sample=False)
        return repr(tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))

    _step("3/4 measuring the converted model on held-out text and sampling both")
    rows = [("original", mla.original_kv_cache_bytes_per_token(), None, sample(model))]
    rows.append(("converted, training-free", mla.kv_cache_bytes_per_token(), text_quality(mla, ids, reference=model),
                 sample(mla)))
    if args.recover_minutes > 0:
        t0 = time.perf_counter()
        _step(f"4/4 recovering for about {args.recover_minutes:g} min: layer-wise on {calib.shape[0] // 2} × "
              f"{calib.shape[1]} tokens of alice29.txt, then distillation to the original's logits on other books")
        if args.recover_steps > 0:
            # at most 40% of the budget (recording included): on a slow machine the sites left keep their SVD start
            recover(mla, model, calib[: calib.shape[0] // 2], RecoveryConfig(steps=args.recover_steps),
                    max_seconds=0.4 * 60 * args.recover_minutes)
        left = max(60 * args.recover_minutes - (time.perf_counter() - t0), 30.0)    # the rest goes to distillation
        distill(mla, model, training_windows(tok, None, 256, args.cache_dir),
                DistillConfig(steps=None, lr=1e-3, batch_size=2), max_seconds=left)    # autocast: what runs fast here
        minutes = (time.perf_counter() - t0) / 60
        rows.append((f"converted + {minutes:.1f} min recovery", mla.kv_cache_bytes_per_token(),
                     text_quality(mla, ids, reference=model), sample(mla)))
    quality = rows[1][2]
    print(f"\nheld-out: {ids.shape[1]} tokens of lcet10.txt (never used for calibration or training)")
    print("| model | KV bytes/token (fp16) | perplexity | top-1 agreement | KL to original |")
    print("|---|---|---|---|---|")
    print(f"| original | {rows[0][1]:,} | {quality.reference_perplexity:.1f} | 100% | 0 |")
    for name, nbytes, q, _ in rows[1:]:
        print(f"| {name} | {nbytes:,} (−{100 * (1 - nbytes / rows[0][1]):.2f}%) | {q.perplexity:.1f} | "
              f"{100 * q.agreement:.0f}% | {q.kl:.2f} |")
    print(f"\nprompt: {args.prompt!r}")
    for name, _, _, text in rows:
        print(f"{name:>28}: {text}")
    print(f"\n(demo took {(time.perf_counter() - t_start) / 60:.1f} min; for the full report see the README's quality "
          "section and `mla-pass recover`)")
    return 0


def _interrupt(signum, frame):
    """SIGTERM / Ctrl-C → ``KeyboardInterrupt`` at the next safe point (the CLI prints one line, exit 130).

    Raised inside an import, the exception can reach a C extension's module init (onnx's pybind11
    enums), which aborts the process (SIGABRT) before any clean-up. So while an import is running the
    signal is re-sent to this process shortly, until it lands outside one."""
    request_stop()          # if this raise is swallowed (it can land in a weakref callback), the next check raises it
    if _importing(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _step(message: str) -> None:
    """One line per demo stage, shown at once (each takes from seconds to minutes)."""
    print(f"\n{message} ...", flush=True)


def cmd_generate(args) -> int:
    """Stream a generation from an exported folder with the torch-free runtime (no torch import)."""
    from ..runtime import OnnxEngine

    check_range("--max-new-tokens", args.max_new_tokens, 1)
    check_range("--temperature", args.temperature, 0)
    check_range("--top-k", args.top_k, 1)
    check_range("--top-p", args.top_p, 0, 1, above=True)
    check_range("--threads", args.threads, 1)
    check_range("--prefill-chunk", args.prefill_chunk, 1)
    engine = OnnxEngine(args.folder, providers=[args.provider] if args.provider else None, threads=args.threads,
                        **({"prefill_chunk": args.prefill_chunk} if args.prefill_chunk else {}))

    def on_token(row, token, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    sys.stdout.write(args.prompt)
    result = engine.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, stop=args.stop, seed=args.seed, on_token=on_token)
    c, m = result.completions[0], engine.manifest
    decode_rate = result.decode_steps / result.decode_seconds if result.decode_seconds > 0 else float("nan")
    print(f"\n[{len(c.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s (prompt {len(c.prompt_ids)} tokens "
          f"in {result.prefill_seconds:.2f} s, decode {decode_rate:.1f} tokens/s), KV cache "
          f"{m.kv_cache_bytes_per_token():,} bytes/token ({m.kind}) in {m.dtype}, stopped: {c.finish_reason}, "
          f"{engine.session.get_providers()[0]}]")
    return 0


def _add_mla_options(p):
    p.add_argument("--d-kv", type=int, default=None, help="latent width per kv head (default: full rank)")
    p.add_argument("--rope-freqs", type=int, default=None, help="rotated cache part, in rotary pairs per kv head: "
                   "each layer keeps n_kv_heads × this many rope slots (default: all)")
    p.add_argument("--rope-strategy", default="auto", choices=["auto", "high", "low", "uniform", "2-norm", "score-error"],
                   help="auto (default): score-error when the model folder has a tokenizer (calibration), else high")
    p.add_argument("--svd", default="joint", choices=["joint", "split"])
    p.add_argument("--activation-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="factorise on calibration activations (8 × 512 tokens of alice29.txt); default: whenever "
                   "the model folder has a tokenizer to calibrate with")
    p.add_argument("--best-effort", action="store_true", help="leave unsupported sites untouched instead of failing")
    p.add_argument("--kv-budget", type=float, default=None, help="fraction of the KV cache to keep, split per "
                   "layer between rotary pairs and latent width (instead of --d-kv)")
    p.add_argument("--rope-mix", default="auto", choices=["auto", "pca", "none"],
                   help="pca: mix each rotary pair across kv heads and keep the best slots anywhere (the default with "
                   "calibration); none: pairs per kv head, as MHA2MLA")
    p.add_argument("--max-rope-width", type=int, default=None, help="with --kv-budget: at most this many rotated "
                   "values per token at any layer (64 for vLLM's CPU_MLA / FlashMLA head size 576)")
    p.add_argument("--refit", action="store_true", help="least-squares refit of the up-projections on calibration "
                   "activations")
    p.add_argument("--nope-fit", default="auto", choices=["auto", "none", "uniform", "attention", "attention-centered"],
                   help="what scores a dropped rotary pair (unmixed slots, --rope-mix none): a 2×2 query map fitted on "
                   "calibration text, or none (its raw q·k); auto (default): attention-centered when the folder has a "
                   "tokenizer and the slots are unmixed, else none")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mla-pass", description=__doc__)
    parser.add_argument("--cache-dir", default=None, help="where fetched models and text are kept "
                        "(default ~/.cache/mla-pass)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list the attention sites the pass finds")
    p.add_argument("model", help=f"'{DEFAULT_MODEL}', a Hugging Face model folder, or a saved mla-pass folder")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("convert", help="convert a model and save it")
    p.add_argument("model")
    p.add_argument("--out", required=True)
    _add_mla_options(p)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("demo", help=f"the main job on {DEFAULT_MODEL}: sites, exactness, savings, recovery, samples")
    _add_mla_options(p)
    p.add_argument("--tokens", type=int, default=512, help="held-out tokens to compare logits on")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--recover-minutes", type=float, default=7.0, help="brief recovery (layer-wise, then "
                   "distillation for the rest of the time); 0: none")
    p.add_argument("--recover-steps", type=int, default=40, help="layer-wise Adam steps per site")
    p.set_defaults(func=cmd_demo, d_kv=32, rope_freqs=4)
    p = sub.add_parser("export", help="write an ONNX folder (compressed cache as graph I/O) for the runtime, or a "
                       "folder vLLM serves (--format vllm)")
    p.add_argument("model", help=f"'{DEFAULT_MODEL}', a Hugging Face model folder, or a saved mla-pass folder")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="onnx", choices=["onnx", "vllm"], help="vllm: a Hugging Face-style checkpoint "
                   "with DeepSeek-style MLA fields, served by vLLM through the mla-pass plugin")
    p.add_argument("--vllm-layout", default="deepseek", choices=["deepseek", "compact"],
                   help="deepseek: every layer padded to latent 512 + rope 64 (vLLM's CPU_MLA and FlashMLA); "
                   "compact: to the widest layer only (Triton MLA)")
    p.add_argument("--original", action="store_true", help="export the unconverted model (key/value cache): "
                   "the baseline for comparisons")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="bfloat16: --format vllm only")
    p.add_argument("--cache-update", default="in_place", choices=["in_place", "concat"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="int8 / int4 weights: onnxruntime's "
                   "MatMulNBits, symmetric, one scale per 32 input channels (as onnxruntime-genai's int8 / int4 "
                   "builds); activations stay float")
    p.add_argument("--latent-cache", default="float", choices=["float", "int8", "int4"],
                   help="int8 / int4: cache the latent as 8-bit codes, or 4-bit ones packed two a byte, with one "
                   "scale per token (converted models)")
    p.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="tensorrt: standard ONNX only (no com.microsoft op, 4-D caches with tokens on axis -2), "
                   "checked against TensorRT's ONNX restrictions")
    p.add_argument("--prefill-form", default=None, choices=["decompressed", "absorbed"],
                   help="converted models: decompressed (the onnxruntime default) runs prompts with K/V expanded "
                   "from the latent and one-token steps absorbed, one If per site; absorbed runs every step "
                   "absorbed (the tensorrt target's)")
    p.add_argument("--max-length", type=int, default=None, help="prompt + new tokens (default: the model's)")
    _add_mla_options(p)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("generate", help="stream a generation from an exported ONNX folder (no torch needed)")
    p.add_argument("folder", help="a folder written by mla_pass.export.to_onnx")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per prefill step (default: "
                   "the runtime's PREFILL_CHUNK; memory grows with chunk × prompt length)")
    p.add_argument("--provider", default=None, help="cpu, cuda or an onnxruntime provider name "
                   "(default: CUDA if available, else CPU)")
    p.set_defaults(func=cmd_generate)
    from .quality import add_commands
    add_commands(sub)                     # eval, recover
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)      # `recover --nproc` relaunches itself with them
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for signum in (signal.SIGTERM, signal.SIGINT):    # staging folders are cleaned up on the way out
        signal.signal(signum, _interrupt)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileExistsError) as e:    # bad input: the library's message says what to do
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:                          # anything else, still one line
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
