"""Whole-model decode on GPU: the original Hugging Face model vs its MLA conversion, in PyTorch.

One decode step (one new token per sequence) after T cached tokens, batch 1 and 16, bf16, for
two decoder shapes built from their configs (random weights: the time of a step does not depend
on the values):

  SmolLM2-135M   30 layers, 9 heads, 3 kv heads, d_h 64 (r = 4, d_kv = 32 / 8)
  Llama-1B-like  16 layers, 32 heads, 8 kv heads, d_h 64, hidden 2048 (Llama-3.2-1B's shape)

Rows per (shape, B, T):
  original        the HF model (SDPA attention) over a DynamicCache of full K/V
  MLA, kernel     ``mla_pass.convert`` at d_kv, r = 4, ``LatentAttention.decode_kernel = True``: the
                  dispatcher's choice (the Triton kernel where it measured faster, see
                  ``kernels/dispatch.py``; ``--force-kernel``: in every layer, as the README's runs did)
  MLA, PyTorch    the same model with ``LatentAttention.decode_kernel = False`` (the fallback math)
  ..., static     the same program over a static cache (``mla_pass.decode.StaticCacheDecoder``:
                  buffers allocated once, written in place; the original runs as the unconverted
                  baseline program, ``mla_pass.baseline.kv_step_program``)
  ..., CUDA graph the static decode step replayed as a CUDA graph (``--graphs``: dynamo's
                  "cudagraphs" backend, or mode="reduce-overhead" with inductor's kernels)

Every cache starts as random tensors of T tokens (no prefill is timed); the growing ones grow by
concatenation, the way each program runs. Time = median over ``--steps`` steps (CUDA-synchronised wall clock,
after warm-up). Also: KV bytes per token (bf16) and peak GPU memory of the step. Before timing,
each shape is checked at full rank (d_kv = None, all rotary pairs) in fp32: the converted model's
decode-step logits equal the original's (≤ 1e-3, TF32 off). Prints a markdown table and writes a
PNG plot.

Run: ``python benchmarks/gpu_model_decode.py [--lengths 4096 16384 65536] [--batches 1 16]
[--plot gpu_model_decode.png] [--json out.json] [--no-static]``. Without CUDA it says so and exits 0.
Also checked on the GPU before timing: static-cache decode gives the growing cache's greedy tokens
(fp32, 2 layers, with and without the CUDA graph).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "Llama-1B-like": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                          max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5),
}
D_KV = {"SmolLM2-135M": (32, 8), "Llama-1B-like": (32, 8)}


def build(shape: str, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def convert(model, d_kv, rope_freqs):
    import mla_pass
    return mla_pass.convert(model, mla_pass.MLAConfig(d_kv=d_kv, rope_freqs=rope_freqs), progress=False)


def exactness_check(shape: str, device) -> float:
    """Full rank, every rotary pair kept, fp32: converted decode-step logits vs the original's."""
    from transformers import DynamicCache
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = dict(SHAPES[shape], num_hidden_layers=2)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).eval()
    mla = convert(model, None, None)
    ids = torch.randint(0, cfg["vocab_size"], (2, 40), device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cache = DynamicCache()
        model(ids[:, :32], attention_mask=mask[:, :32], past_key_values=cache, use_cache=True)
        _, *past = mla.step_with_cache(ids[:, :32], mask[:, :32], mla.empty_cache(2))
        err = 0.0
        for i in range(32, 40):
            ref = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache, use_cache=True).logits
            got, *past = mla.step_with_cache(ids[:, i:i + 1], mask[:, :i + 1], past)
            err = max(err, (got.float() - ref.float()).abs().max().item())
    return err


def random_dynamic_cache(model, batch: int, t: int):
    from transformers import DynamicCache
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    p = next(model.parameters())
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, cfg.num_key_value_heads, t, head_dim, dtype=p.dtype, device=p.device)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def random_latent_cache(mla, batch: int, t: int):
    p = next(mla.program.parameters())
    return [torch.randn(mla.plans[s.site].cache_shape(s.kind, batch, t), dtype=p.dtype, device=p.device)
            for s in mla.cache_spec]


def static_check(shape: str, device) -> dict:
    """fp32, 2 layers, converted at d_kv 8: greedy tokens of ``generate`` over the growing cache,
    the static cache, and the static cache under CUDA graphs → whether each matches."""
    import mla_pass
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": 2}, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    mla = mla_pass.convert(model, mla_pass.MLAConfig(d_kv=8, rope_freqs=4), progress=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), device=device, generator=torch.Generator(device).manual_seed(1))
    from mla_pass.decode import COMPILES
    with torch.no_grad():
        want = mla.generate(ids, max_new_tokens=16, eos_token_id=None, static_cache=False)
        static = mla.generate(ids, max_new_tokens=16, eos_token_id=None, static_cache=True)
        checks = {"static_tokens_equal": bool(torch.equal(static, want))}
        for mode in COMPILES:
            graphs = mla.generate(ids, max_new_tokens=16, eos_token_id=None, static_cache=True, compile=mode)
            checks[f"{mode}_tokens_equal"] = bool(torch.equal(graphs, want))
            torch._dynamo.reset()
    return checks


def time_steps(step, steps: int, warmup: int = 3) -> tuple[float, int]:
    """Median seconds of ``step()`` (each call synchronised) and the peak memory it allocated."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated()


@torch.no_grad()
def measure_original(model, batch: int, t: int, steps: int) -> dict:
    cache = random_dynamic_cache(model, batch, t)
    state = {"mask": torch.ones(batch, t, dtype=torch.long, device="cuda")}
    tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")

    def step():
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(batch, 1)], dim=1)
        model(tok, attention_mask=state["mask"], past_key_values=cache, use_cache=True)

    sec, peak = time_steps(step, steps)
    del cache
    return {"sec": sec, "peak": peak}


@torch.no_grad()
def measure_mla(mla, batch: int, t: int, steps: int, kernel: bool) -> dict:
    from mla_pass.modules.latent_attention import LatentAttention
    for m in mla.modules():
        if isinstance(m, LatentAttention):
            m.decode_kernel = kernel
    state = {"past": random_latent_cache(mla, batch, t), "mask": torch.ones(batch, t, dtype=torch.long, device="cuda")}
    tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")

    def step():
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(batch, 1)], dim=1)
        _, *state["past"] = mla.step_with_cache(tok, state["mask"], state["past"])

    sec, peak = time_steps(step, steps)
    state.clear()
    return {"sec": sec, "peak": peak}


@torch.no_grad()
def measure_static(step, cache_spec, plans, batch: int, t: int, steps: int, graphs: str | None,
                   warmup: int = 3) -> dict:
    """One decode step over a static cache already holding T random tokens (``graphs``: the
    decode step compiled that way, ``decode.COMPILES``: CUDA graphs; compiled during the warm-up)."""
    from mla_pass.decode import StaticCacheDecoder
    decoder = StaticCacheDecoder(step, cache_spec, plans, batch, t + warmup + steps + 1, compile=graphs)
    for c in decoder.caches:
        c.normal_()
    decoder.slots[:, :t] = 1
    decoder.length = t
    tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")

    def one():
        decoder(tok, torch.ones(batch, decoder.length + 1, dtype=torch.long, device="cuda"))

    sec, peak = time_steps(one, steps, warmup)
    torch._dynamo.reset()
    return {"sec": sec, "peak": peak}


def plot(rows: list[dict], path: str, device_name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["shape"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.2), squeeze=False)
    for ax, (shape, b) in zip(axes[0], keys):
        sel = [r for r in rows if r["shape"] == shape and r["batch"] == b]
        for variant in dict.fromkeys(r["variant"] for r in sel):
            pts = sorted((r["T"], 1e3 * r["sec"]) for r in sel if r["variant"] == variant)
            ax.plot(*zip(*pts), "o-" if variant != "original" else "s--", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{shape}, batch {b}")
        ax.set_xlabel("cached tokens T")
        ax.set_ylabel("ms per decode step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Decode step, whole model, bf16, {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-cache-gib", type=float, default=24.0,
                    help="skip (shape, B, T) whose original K/V cache would exceed this")
    ap.add_argument("--force-kernel", action="store_true",
                    help="use the Triton kernel in every layer, not only where the dispatcher expects it to pay")
    ap.add_argument("--plot", default="gpu_model_decode.png")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-static", action="store_true", help="skip the static-cache and CUDA-graph rows")
    ap.add_argument("--graphs", default="cudagraphs", choices=["cudagraphs", "reduce-overhead"],
                    help="how the static decode step is captured (reduce-overhead: inductor, minutes per compile)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU decode and prints nothing else without one")
        return 0
    if args.force_kernel:
        from mla_pass.kernels import dispatch
        dispatch.KERNEL_MAX_LATENT, dispatch.KERNEL_MIN_CACHE_BYTES = 1 << 30, 0
    device_name = torch.cuda.get_device_name()
    print(f"device: {device_name}, torch {torch.__version__}")
    rows, checks = [], {}
    for shape in args.shapes:
        checks[shape] = {"full_rank_max_abs_logit_error": exactness_check(shape, "cuda")}
        print(f"{shape}: full-rank exactness (fp32, 2 layers, 8 decode steps): "
              f"max |Δlogits| = {checks[shape]['full_rank_max_abs_logit_error']:.2e}", flush=True)
        if not args.no_static:
            checks[shape].update(static_check(shape, "cuda"))
            print(f"{shape}: static cache / CUDA graph give the growing cache's tokens: {checks[shape]}", flush=True)
        model = build(shape, torch.bfloat16, "cuda")
        t0 = time.perf_counter()
        mlas = {d: convert(model, d, 4) for d in D_KV[shape]}     # in bf16: the program keeps its dtype
        print(f"{shape}: converted at d_kv {D_KV[shape]} in {time.perf_counter() - t0:.1f} s", flush=True)
        orig_bytes = next(iter(mlas.values())).original_kv_cache_bytes_per_token(torch.bfloat16)
        from mla_pass.baseline import kv_step_program
        baseline = kv_step_program(model)
        for b in args.batches:
            for t in args.lengths:
                if orig_bytes * b * t > args.max_cache_gib * 2**30:
                    print(f"skip {shape} B={b} T={t}: original cache {orig_bytes * b * t / 2**30:.1f} GiB")
                    continue
                variants = [("original", orig_bytes, lambda: measure_original(model, b, t, args.steps))]
                programs = [("original", orig_bytes, baseline.step, baseline.cache_spec, baseline.plans)]
                for d, mla in mlas.items():
                    nbytes = mla.kv_cache_bytes_per_token(torch.bfloat16)
                    variants += [(f"MLA d_kv={d}, kernel", nbytes, lambda m=mla: measure_mla(m, b, t, args.steps, True)),
                                 (f"MLA d_kv={d}, PyTorch", nbytes, lambda m=mla: measure_mla(m, b, t, args.steps, False))]
                    programs.append((f"MLA d_kv={d}", nbytes, mla.step, mla.cache_spec, mla.plans))
                for name, nbytes, step, spec, plans in ([] if args.no_static else programs):
                    for graphs in (None, args.graphs):
                        label = f"{name}, static" + (f", CUDA graph ({graphs})" if graphs else "")
                        run = lambda a=(step, spec, plans), g=graphs: measure_static(*a, b, t, args.steps, g)  # noqa
                        variants.append((label, nbytes, run))
                base = None
                for name, nbytes, run in variants:
                    r = run()
                    torch.cuda.empty_cache()
                    base = base or r["sec"]
                    rows.append(dict(shape=shape, batch=b, T=t, variant=name, bytes_per_token=nbytes, **r,
                                     speedup=base / r["sec"]))
                    print(f"  {shape} B={b} T={t} {name}: {1e3 * r['sec']:.2f} ms ({base / r['sec']:.2f}x)", flush=True)
        del model, mlas
        torch.cuda.empty_cache()
    print(f"\n{device_name}, bf16, median of {args.steps} decode steps after T cached tokens; "
          "speed-up vs the original at the same (shape, B, T)\n")
    print("| shape | B | T | variant | KV bytes/token | ms/step | tokens/s | speed-up | peak GPU memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['T']} | {r['variant']} | {r['bytes_per_token']:,} | "
              f"{1e3 * r['sec']:.2f} | {r['batch'] / r['sec']:,.0f} | {r['speedup']:.2f}× | {r['peak'] / 2**30:.2f} GiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "checks": checks, "rows": rows}, f, indent=1)
    if rows and args.plot:
        plot(rows, args.plot, device_name)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
