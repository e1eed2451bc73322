"""Decode attention on GPU: the fused latent kernel vs the original layer's attention on full K/V.

One decode step (one query per sequence) of one attention layer, for SmolLM2-135M's shapes (9 heads,
3 kv heads, d_h 64, r 4, d_kv 8 / 32 → c 24 / 96) and a Llama-2-7B-like layer (32 heads, 32 kv
heads, d_h 128, r 8, d_kv 16 / 64 → c 512 / 2048), at T = 4k, 16k, 64k cached tokens, batch 1 and 16,
bf16. Timed per call (median, L2 flushed between calls, ``triton.testing.do_bench``):

  original      SDPA on the full K/V cache of the original layer (``enable_gqa``), and
                ``flash_attn_with_kvcache`` (split-KV flash decoding) when flash-attn is installed;
                the faster of the two is the baseline
  kernel        ``decode_attention`` alone: latent + rope-key cache → latent output
  absorbed step the whole absorbed attention of the converted layer: W_ukᵀ q → kernel → W_uv
  PyTorch       ``absorbed_attention`` (the CPU/fallback path) on the same GPU

Bandwidth = cache bytes read / time, as a fraction of the GPU's peak (table below, or
``--peak-gbps``). The issue's targets: ≥ 70% of peak at T ≥ 16k, and an attention-time speedup of
at least 0.8 × the cache-bytes ratio. Each configuration is first checked against the PyTorch
reference. Prints a markdown table and writes a PNG plot.

Run: ``python benchmarks/gpu_decode.py [--plot gpu_decode.png] [--peak-gbps N]``. Without CUDA it
says so, runs a tiny check of the kernel under Triton's interpreter (``--no-smoke`` to skip) and
exits 0: it never prints made-up numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass

import torch

# HBM peak by device name (GB/s, vendor figures); the first key found in the name wins
PEAK_GBPS = [("h200", 4800), ("h100 nvl", 3900), ("h100 pcie", 2000), ("h100", 3350),
             ("a100-sxm4-80gb", 2039), ("a100 80gb pcie", 1935), ("a100", 1555),
             ("l40s", 864), ("a10g", 600), ("l4", 300), ("rtx 4090", 1008)]


@dataclass(frozen=True)
class LayerShape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    d_kv: int
    rope_freqs: int

    @property
    def latent(self) -> int:
        return self.kv_heads * self.d_kv

    @property
    def rope_width(self) -> int:
        """Shared rope slots' values: Hkv · rope_freqs slots, 2 values each, one set for every head."""
        return 2 * self.rope_freqs * self.kv_heads

    def cache_values(self) -> int:
        return self.latent + self.rope_width

    def original_values(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def label(self) -> str:
        return f"{self.name} d_kv={self.d_kv}"


SHAPES = [LayerShape("SmolLM2-135M", 9, 3, 64, 8, 4), LayerShape("SmolLM2-135M", 9, 3, 64, 32, 4),
          LayerShape("Llama-2-7B-like", 32, 32, 128, 16, 8), LayerShape("Llama-2-7B-like", 32, 32, 128, 64, 8)]


def peak_gbps(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    name = device_name.lower()
    return next((v for k, v in PEAK_GBPS if k in name), None)


def smoke_check() -> None:
    """A tiny case of the kernel under Triton's interpreter on CPU against the reference."""
    if "triton" in sys.modules:
        print("triton already imported without the interpreter: smoke check skipped")
        return
    os.environ["TRITON_INTERPRET"] = "1"
    from mla_pass.kernels import DecodeKernelConfig, decode_attention, decode_attention_reference
    g = torch.Generator().manual_seed(0)
    q, qr = torch.randn(2, 9, 24, generator=g), torch.randn(2, 9, 8, generator=g)
    lat, rk = torch.randn(2, 100, 24, generator=g), torch.randn(2, 1, 100, 8, generator=g)
    lengths, start = torch.tensor([100, 61]), torch.tensor([0, 7])
    out = decode_attention(q, qr, lat, rk, 0.125, lengths, start_B=start, config=DecodeKernelConfig(num_splits=3))
    err = (out - decode_attention_reference(q, qr, lat, rk, 0.125, lengths, start_B=start)).abs().max().item()
    print(f"interpreter smoke check (SmolLM2 shapes, c=24, T=100, 3 splits): max |kernel − reference| = {err:.2e}")
    if err > 1e-4:
        raise SystemExit("smoke check failed")


def make_inputs(s: LayerShape, b: int, t: int, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    n_nope = s.head_dim                    # every dim scores unrotated too (the kept slots are projected out)
    return dict(
        q=rnd(b, s.heads, 1, s.head_dim), k=rnd(b, s.kv_heads, t, s.head_dim), v=rnd(b, s.kv_heads, t, s.head_dim),
        q_nope=rnd(b, s.heads, 1, n_nope), q_rope=rnd(b, s.heads, 1, s.rope_width), latent=rnd(b, t, s.latent),
        rope_key=rnd(b, 1, t, s.rope_width), up_key=rnd(s.kv_heads, n_nope, s.latent) * s.latent ** -0.5,
        up_value=rnd(s.kv_heads, s.head_dim, s.latent) * s.latent ** -0.5,
        kv=torch.arange(s.heads, device=device) // (s.heads // s.kv_heads),
        mask=torch.ones(b, 1, 1, t, dtype=torch.bool, device=device))


def original_fns(x, s: LayerShape):
    import torch.nn.functional as F
    fns = {"SDPA": lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], enable_gqa=s.heads != s.kv_heads)}
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return fns
    q, k, v = (x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v"))   # flash-attn wants [B, T, H, D]
    fns["flash decode"] = lambda: flash_attn_with_kvcache(q, k, v)
    return fns


def measure(s: LayerShape, b: int, t: int, dtype, peak: float | None, device) -> dict:
    from triton.testing import do_bench

    from mla_pass.kernels import decode_attention, decode_attention_reference
    from mla_pass.kernels.dispatch import fused_absorbed
    from mla_pass.math.attention import absorbed_attention, latent_query

    x = make_inputs(s, b, t, dtype, device)
    scale = s.head_dim ** -0.5
    kv_heads = x["kv"].tolist()
    q_lat = latent_query(x["q_nope"], x["up_key"], x["kv"])[:, :, 0].contiguous()
    q_rope = x["q_rope"][:, :, 0].contiguous()
    kernel = lambda: decode_attention(q_lat, q_rope, x["latent"], x["rope_key"], scale)  # noqa: E731
    step = lambda: fused_absorbed(x["q_nope"], x["q_rope"], x["latent"], x["rope_key"], x["up_key"],  # noqa: E731
                                  x["up_value"], None, x["kv"], kv_heads, scale, x["mask"])
    torch_abs = lambda: absorbed_attention(x["q_nope"], x["q_rope"], x["latent"], x["rope_key"], x["up_key"],  # noqa: E731
                                           x["up_value"], None, x["kv"], scale, x["mask"])
    one = slice(0, 1)   # check on the first sequence (the fp32 reference of a full batch can be large)
    ref = decode_attention_reference(q_lat[one], q_rope[one], x["latent"][one], x["rope_key"][one], scale)
    err = ((kernel()[one].float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    err_step = ((step().float() - torch_abs().float()).abs().max() / torch_abs().float().abs().max()).item()
    ms = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    originals = {name: ms(fn) for name, fn in original_fns(x, s).items()}
    base_name = min(originals, key=originals.get)
    elem = torch.finfo(dtype).bits // 8
    cache_bytes = b * t * s.cache_values() * elem
    original_bytes = b * t * s.original_values() * elem
    r = dict(shape=s, b=b, t=t, err=err, err_step=err_step, base_name=base_name, original=originals[base_name],
             originals=originals, kernel=ms(kernel), step=ms(step), torch=ms(torch_abs),
             ratio=original_bytes / cache_bytes)
    r["gbps"] = cache_bytes / r["kernel"] / 1e6
    r["gbps_original"] = original_bytes / r["original"] / 1e6
    r["peak"] = peak
    del x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def _tokens(t: int) -> str:
    return f"{t // 1024}k" if t % 1024 == 0 else str(t)


def table(rows: list[dict]) -> str:
    pct = lambda v, p: f"{100 * v / p:.0f}%" if p else "n/a"  # noqa: E731
    lines = ["| layer | cached values/token (orig → MLA) | B | T | original attn µs | kernel µs | absorbed step µs "
             "| PyTorch absorbed µs | speedup (step) | cache-bytes ratio | speedup / ratio | kernel GB/s (% peak) "
             "| original GB/s (% peak) | check (rel. err) |",
             "|" + "---|" * 14]
    for r in rows:
        s = r["shape"]
        speedup = r["original"] / r["step"]
        lines.append(
            f"| {s.label()} | {s.original_values()} → {s.cache_values()} | {r['b']} | {_tokens(r['t'])} "
            f"| {1e3 * r['original']:.1f} ({r['base_name']}) | {1e3 * r['kernel']:.1f} | {1e3 * r['step']:.1f} "
            f"| {1e3 * r['torch']:.1f} | {speedup:.2f}× | {r['ratio']:.2f}× | {speedup / r['ratio']:.2f} "
            f"| {r['gbps']:.0f} ({pct(r['gbps'], r['peak'])}) | {r['gbps_original']:.0f} ({pct(r['gbps_original'], r['peak'])}) "
            f"| {max(r['err'], r['err_step']):.1e} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, device_name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    keys = sorted({(r["shape"].label(), r["b"]) for r in rows})
    for i, (label, b) in enumerate(keys):
        sel = [r for r in rows if (r["shape"].label(), r["b"]) == (label, b)]
        ts = [r["t"] for r in sel]
        color = f"C{i}"
        axes[0].plot(ts, [1e3 * r["original"] for r in sel], "--", color=color)
        axes[0].plot(ts, [1e3 * r["step"] for r in sel], "-o", color=color, label=f"{label}, B={b}")
        if sel[0]["peak"]:
            axes[1].plot(ts, [100 * r["gbps"] / r["peak"] for r in sel], "-o", color=color, label=f"{label}, B={b}")
    axes[0].set(xscale="log", yscale="log", xlabel="cached tokens T", ylabel="µs per decode step (one layer)",
                title="absorbed step (solid) vs original attention (dashed)")
    axes[1].set(xscale="log", xlabel="cached tokens T", ylabel="% of peak HBM bandwidth", ylim=(0, 100),
                title="kernel: cache bytes read / time")
    axes[1].axhline(70, color="gray", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"MHA2MLA latent decode, {device_name}, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth (else a table by name)")
    parser.add_argument("--plot", default="gpu_decode.png", help="where to write the PNG plot")
    parser.add_argument("--no-smoke", action="store_true", help="without CUDA: skip the interpreter check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device: this benchmark needs a GPU, and no GPU numbers were measured.")
        if not args.no_smoke:
            smoke_check()
        return 0
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_gbps(name, args.peak_gbps)
    print(f"device: {name}; peak HBM bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbps)'}; "
          f"torch {torch.__version__}")
    rows = []
    for s in SHAPES:
        for b in args.batches:
            for t in args.lengths:
                r = measure(s, b, t, torch.bfloat16, peak, device)
                rows.append(r)
                print(f"  {s.label()} B={b} T={t}: original {1e3 * r['original']:.1f} µs ({r['base_name']}), "
                      f"kernel {1e3 * r['kernel']:.1f} µs, step {1e3 * r['step']:.1f} µs, check {r['err']:.1e}",
                      flush=True)
    print()
    print(table(rows))
    long = [r for r in rows if r["t"] >= 16384]
    if peak and long:
        print(f"\nkernel bandwidth at T ≥ 16k: median {100 * statistics.median(r['gbps'] / peak for r in long):.0f}% "
              f"of peak (target ≥ 70%); speedup / cache-bytes ratio: median "
              f"{statistics.median(r['original'] / r['step'] / r['ratio'] for r in long):.2f} (target ≥ 0.8)")
    plot(rows, args.plot, name)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
