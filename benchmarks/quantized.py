"""What int8 / int4 weights and the int8 latent cache cost in quality, and what they save (a benchmark).

SmolLM2-135M, original and converted with the project default (calibrated on alice29, d_kv and
r = 4), each exported by ``mla_pass.export.to_onnx`` as: fp32; int8 or int4 latent cache
(``latent_cache="int8" | "int4"``); int8 or int4 weights (``quantize="int8" | "int4"``: MatMulNBits, 8
or 4 bits, blocks of 32, symmetric, the tied lm_head included, as onnxruntime-genai's int8 / int4
builds); weights and cache together. Every folder is run by ``mla_pass.runtime.OnnxEngine`` (onnxruntime CPU)
as one prefill per held-out window of ``lcet10.txt`` — through the cache: the int8 latent is
quantized as it is written, and the attention reads it back from the cache — and compared with
the original PyTorch model on the same windows: perplexity, top-1 agreement, KL(original ‖
variant). Also: KV-cache bytes per token and the folder's size on disk.

    python benchmarks/quantized.py --windows 4 --d-kv 32        # table → benchmarks/results/quantized.md
    python benchmarks/quantized.py --original --d-kv 8 32 --variants fp32 "int4 weights" --out DIR
    python benchmarks/quantized.py ... --genai-int4 DIR4     # + onnxruntime-genai's int4 build, side by side
    python benchmarks/quantized.py --windows 1 --length 4096 --passkey --variants fp32 "int4 latent cache" ...

``--genai-int4`` / ``--genai-int8`` add onnxruntime-genai's own build of the original (its model
builder's ``-p int4`` / ``-p int8``): its ``model.onnx`` is run by onnxruntime with an empty past
(one prefill per window, as ours), the same held-out windows and reference.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mla_pass
from mla_pass import MLAConfig, assets
from mla_pass.quality.evaluate import text_quality
from mla_pass.quality.passkey import PasskeyConfig, passkey
from mla_pass.quality.windows import calibration_windows, held_out_windows

sys.path.insert(0, str(Path(__file__).parent))
from decode import source_fingerprint  # noqa: E402  (one definition for both benchmarks)

ROPE_FREQS = 4
VARIANTS = {            # name: (quantize, latent_cache)
    "fp32": (None, "float"),
    "int8 latent cache": (None, "int8"),
    "int8 weights": ("int8", "float"),
    "int8 weights + int8 latent cache": ("int8", "int8"),
    "int4 weights": ("int4", "float"),
    "int4 weights + int8 latent cache": ("int4", "int8"),
    "int4 latent cache": (None, "int4"),
    "int4 weights + int4 latent cache": ("int4", "int4"),
}


class EngineLogits(nn.Module):
    """An exported folder as a logits function for ``text_quality`` (one prefill from an empty
    cache) and a greedy decoder for ``passkey`` (the runtime's generate: the prompt prefilled in
    chunks through the cache, then one-token steps reading it back)."""

    def __init__(self, folder: Path, threads: int):
        super().__init__()
        from mla_pass.runtime import OnnxEngine
        self.engine = OnnxEngine(folder, threads=threads)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.cpu().numpy()
        out = self.engine.step(ids, np.ones_like(ids))
        return torch.from_numpy(np.asarray(out.logits, dtype=np.float32))

    def greedy(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        r = self.engine.generate(ids.tolist(), max_new_tokens=max_new_tokens, temperature=0.0)
        return torch.tensor([c.token_ids for c in r.completions])


class GenaiLogits(nn.Module):
    """onnxruntime-genai's build of the original as a logits function: its model.onnx (GroupQueryAttention
    over past_key_values.{i}.key|value) run by onnxruntime from an empty past."""

    def __init__(self, folder: Path, threads: int):
        super().__init__()
        import json

        import onnxruntime as ort
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.pasts = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.cache_dtype = np.float16 if "float16" in self.session.get_inputs()[2].type else np.float32
        self.kv_heads, self.head_size = int(decoder["num_key_value_heads"]), int(decoder["head_size"])
        # K and V of every layer, in the cache's dtype
        self.kv_bytes_per_token = len(self.pasts) * self.kv_heads * self.head_size * np.dtype(self.cache_dtype).itemsize

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.cpu().numpy().astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds.update({n: np.zeros((ids.shape[0], self.kv_heads, 0, self.head_size), self.cache_dtype)
                      for n in self.pasts})
        logits = self.session.run(["logits"], feeds)[0]
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))


def export_variants(model, tok, d_kv: int | None, cache: Path, names) -> dict[str, Path]:
    from mla_pass.export.onnx import to_onnx
    source = model
    if d_kv is not None:
        calib = calibration_windows(tok, 16, 512)
        source = mla_pass.convert(model, MLAConfig(d_kv=d_kv, rope_freqs=ROPE_FREQS), calibration=calib)
    folders = {}
    for name in names:
        quantize, latent_cache = VARIANTS[name]
        if d_kv is None and latent_cache != "float":
            continue
        folder = cache / f"{'original' if d_kv is None else f'mla_d_kv{d_kv}'}_{name.replace(' ', '_').replace('+', 'and')}"
        if not (folder / "manifest.json").is_file():
            t0 = time.perf_counter()
            to_onnx(source, folder, tokenizer=tok, quantize=quantize, latent_cache=latent_cache, max_length=4096)
            print(f"exported {folder.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        folders[name] = folder
    return folders


def passkey_cell(result) -> str:
    """Keys retrieved per prompt length, e.g. ``1024: 5/5, 2048: 4/5``."""
    return ", ".join(f"{n}: {sum(t.correct for t in result.trials if t.length == n)}/"
                     f"{sum(t.length == n for t in result.trials)}" for n in result.by_length)


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-kv", type=int, nargs="+", default=[32], help="converted budgets to measure")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--original", action="store_true", help="also the original (its variants without a latent cache)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--genai-int4", type=Path, default=None, help="onnxruntime-genai's -p int4 build of the original")
    p.add_argument("--genai-int8", type=Path, default=None, help="onnxruntime-genai's -p int8 build of the original")
    p.add_argument("--passkey", type=int, nargs="*", default=None, metavar="LENGTH",
                   help="also passkey retrieval through each folder's cache at these prompt lengths (default 1024 "
                   "2048; 5 depths, one key each)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = assets.load_smollm2()
    cache = Path(assets.default_cache_dir()) / "exports" / f"quantized-{source_fingerprint()}"
    windows = held_out_windows(tok, a.windows, a.length)
    rows = []
    for name, folder in (("int8 weights (onnxruntime-genai's build)", a.genai_int8),
                         ("int4 weights (onnxruntime-genai's build)", a.genai_int4)):
        if folder is None:
            continue
        genai = GenaiLogits(folder, a.threads)
        q = text_quality(genai, windows, reference=model, progress=False)
        rows.append(("original (genai)", name, genai.kv_bytes_per_token, folder_mb(folder), q, None))
        print(f"genai {name}: ppl {q.perplexity:.2f} top-1 {q.agreement:.1%} KL {q.kl:.4f}", flush=True)
    models = ([None] if a.original else []) + a.d_kv
    for d_kv in models:
        folders = export_variants(model, tok, d_kv, cache, a.variants)
        for name, folder in folders.items():
            engine = EngineLogits(folder, a.threads)
            q = text_quality(engine, windows, reference=model, progress=False)
            m = engine.engine.manifest
            label = "original" if d_kv is None else f"MLA d_kv={d_kv}, r={ROPE_FREQS}"
            keys = None
            if a.passkey is not None:
                keys = passkey(engine, tok, PasskeyConfig(lengths=tuple(a.passkey or (1024, 2048))), progress=False)
            rows.append((label, name, m.kv_cache_bytes_per_token(), folder_mb(folder), q, keys))
            print(f"{label:22s} {name:34s} ppl {q.perplexity:9.2f} (orig {q.reference_perplexity:.2f}) "
                  f"top-1 {q.agreement:.1%} KL {q.kl:.4f} KV B/token {m.kv_cache_bytes_per_token():,} "
                  f"folder {folder_mb(folder):.0f} MB" + (f" passkey {passkey_cell(keys)}" if keys else ""),
                  flush=True)
    lines = [f"SmolLM2-135M, {a.windows} × {a.length} held-out tokens of lcet10.txt, onnxruntime CPU; "
             f"reference: the original in PyTorch (ppl {rows[0][4].reference_perplexity:.2f}). "
             f"Command: `python benchmarks/quantized.py {shlex.join(sys.argv[1:])}`", "",
             "| model | variant | KV bytes/token | folder MB | ppl | top-1 vs original | KL to original |"
             + (" passkey |" if a.passkey is not None else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if a.passkey is not None else "")]
    for label, name, nbytes, mb, q, keys in rows:
        lines.append(f"| {label} | {name} | {nbytes:,} | {mb:.0f} | {q.perplexity:.2f} | {q.agreement:.1%} | {q.kl:.4f} |"
                     + (f" {passkey_cell(keys) if keys else '—'} |" if a.passkey is not None else ""))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quantized.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
