"""The export check: the written folder, run by onnxruntime, against the PyTorch step program it came from.

Float exports are held to a max-|Δ| tolerance on the example step; int8 folders are checked over the
model's own greedy text and a past its own prefill wrote (random tokens put a deep model where int8
weights throw its logits around), by the relative RMS error of each output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mla_pass.export.common import ExportError
from mla_pass.export.quantize import dequantized_weights
from mla_pass.math.int8_cache import dequantize_per_token, unpack_int4
from mla_pass.modules.cache import cache_time_axis
from mla_pass.runtime.manifest import Manifest


@torch.no_grad()
def self_filled_inputs(wrapper: nn.Module, args: tuple, spec, vocab: int, cache_update: str) -> tuple:
    """The example step (its mask and positions) over text and a past the program itself wrote
    (``model_text``): a prefill of the text's first T tokens from an empty cache gives the past,
    the last S are the step's new tokens."""
    ids, mask, pos, *past = args
    t = mask.shape[1] - ids.shape[1]
    text = model_text(wrapper, args, spec, vocab, cache_update)
    present = prefill(wrapper, text[:, :t], mask, past, spec, cache_update)[1:]
    return (text[:, t:].contiguous(), mask, pos, *present)


@torch.no_grad()
def model_text(wrapper: nn.Module, args: tuple, spec, vocab: int, cache_update: str) -> torch.Tensor:
    """[B, T+S] tokens: each row starts from one random token (after its left padding) and
    continues greedily. Random tokens would put a deep model where int8 weights throw its logits
    around (SmolLM2 at d_kv=32: relative RMS error of the logits 1.05 on random ids, 0.07 over
    real text); its own continuation is text the model finds plausible, and needs no tokenizer."""
    ids, mask, pos, *past = args
    total = mask.shape[1]
    text = torch.randint(0, vocab, (ids.shape[0], total), generator=torch.Generator().manual_seed(1)).to(ids.device)
    first = mask.argmax(-1)                 # each row's first real token
    for j in range(1, total):
        greedy = prefill(wrapper, text[:, :j], mask, past, spec, cache_update)[0][:, -1].argmax(-1)
        text[:, j] = torch.where(first < j, greedy, text[:, j])
    return text


def prefill(wrapper: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, past: list, spec, cache_update: str):
    """The step program on ``tokens`` (the first n columns of ``mask``) from an empty cache."""
    n = tokens.shape[1]
    if cache_update == "in_place":          # the same buffers, zeroed: the prefill writes tokens [0, n)
        empty = [torch.zeros_like(p) for p in past]
    else:                                   # concat: a past of length 0
        empty = [p.narrow(cache_time_axis(c.kind), 0, 0) for p, c in zip(past, spec)]
    return wrapper(tokens, mask[:, :n], (mask[:, :n].cumsum(-1) - 1).clamp(min=0), *empty)


def check_export(folder: Path, manifest: Manifest, wrapper: nn.Module, args: tuple, dtype: str,
            quantized: str | None = None) -> dict[str, float | str]:
    """Run the written model in onnxruntime on the example step; refuse the export on mismatch.
    Returns the figures for the manifest's notes: the largest |Δ| of the logits and, for an
    approximate program (``quantized`` weights "int8" / "int4", or an int8 latent cache), its
    worst output's relative RMS error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3      # no "in-place not activated" notes: nothing is bound here
    session = ort.InferenceSession(str(folder / manifest.model_file), options, providers=["CPUExecutionProvider"])
    reference = None
    if quantized:       # the same program over the float weights the codes stand for (see _check_step)
        import onnx
        model = dequantized_weights(onnx.load(str(folder / manifest.model_file)))
        reference = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del model
    # a prompt step and a one-token step: a converted program may run a different form in each (If on S)
    figures = _check_step(session, manifest, wrapper, args, dtype, quantized, "a prompt step", reference)
    ids, mask, pos, *past = args
    one = (ids[:, :1], mask[:, :mask.shape[1] - ids.shape[1] + 1], pos[:, :1], *past)
    one_token = _check_step(session, manifest, wrapper, one, dtype, quantized, "a one-token step", reference)
    figures.update({k.replace("verify_", "verify_one_token_"): v for k, v in one_token.items()})
    return figures


def _check_step(session, manifest: Manifest, wrapper: nn.Module, args: tuple, dtype: str, quantized: str | None,
                step: str, reference=None) -> dict[str, float | str]:
    names = ["input_ids", "attention_mask", "position_ids"] + [e.input for e in manifest.cache]
    feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
    layout = {e.input: e for e in manifest.cache} | {e.output: e for e in manifest.cache}
    for name in feeds.keys() & layout.keys():       # the folder's layout (the TensorRT target: [B, 1, T, C])
        feeds[name] = _as_laid_out(feeds[name], layout[name])
    if dtype == "float16":
        feeds.update({e.input: feeds[e.input].astype(np.float16) for e in manifest.cache if e.dtype == "float16"})
    got = session.run(None, feeds)
    if reference is not None:        # quantized weights: the float program was checked against PyTorch before
        want, against = reference.run(None, feeds), "the same program over its dequantized weights"
    else:
        with torch.no_grad():
            want = [t.float().cpu().numpy() for t in wrapper(*args)]
        want, against = [want[0]] + [_as_laid_out(w, e) for w, e in zip(want[1:], manifest.cache)], "PyTorch"
    # float programs: max |Δ| relative to the largest value (fp32: 1e-3, since round-off grows
    # over a real model's depth — SmolLM2's 30 layers reach ~3e-4 on the cache — while a wrong
    # program is off by O(1)). Quantized weights are judged against the same program over the
    # float weights their codes stand for (``reference``, ``quantize.dequantized_weights``; the
    # float program was held to PyTorch before quantizing): what remains is accuracy level 4's
    # 8-bit activations, measured at a relative RMS error of the logits of 0.044 (SmolLM2) and
    # 0.048 (d_kv=32) over text, where an unrelated output is ≈ √2. (Against PyTorch's float program
    # int4 weights moved a converted SmolLM2's logits by 1.05–1.18 of their spread: that is the
    # rounding's quality, measured by benchmarks/quantized.py, not the export's correctness.)
    # An int8 latent cache rounds inside the graph, as PyTorch's program does: a code flipped at a
    # rounding tie is a change later layers carry. Approximate programs are judged by the RMS error
    # relative to the output's spread (its std, so a shared offset such as the logits' mean cannot
    # hide an error), ≤ 0.5; exactness of the int8 program is tests/test_int8_cache.py's job
    # (≤ 1e-4, tiny model). An int8 latent is compared as the values it stands for.
    int8_outputs = {e.output for e in manifest.cache if e.dtype in ("int8", "uint8")}
    approximate = bool(quantized) or bool(int8_outputs)
    tol = 0.5 if approximate else 1e-3 if dtype == "float32" else 2e-2
    names = ["logits"] + [e.output for e in manifest.cache]
    got, want = dict(zip(names, got)), dict(zip(names, want))
    four_bit = str(manifest.notes.get("latent_cache", "")).startswith("4-bit")
    for name in int8_outputs:                   # its scales are the output named <latent>_scale
        codes, scales = (got[name], want[name]), (got[name + "_scale"], want[name + "_scale"])
        if codes[0].shape == codes[1].shape and scales[0].shape == scales[1].shape:   # else: a shape error below
            if four_bit:                        # both unpacked alike (an odd width's padding code is 0 in both)
                codes = tuple(unpack_int4(torch.from_numpy(c.astype(np.uint8)), 2 * c.shape[-1]).numpy() for c in codes)
            got[name], want[name] = (dequantize_per_token(torch.from_numpy(c), torch.from_numpy(sc).float()).numpy()
                                     for c, sc in zip(codes, scales))
    figures: dict[str, float | str] = {}
    total = args[1].shape[1]
    time_axes = {e.output: e.time_axis for e in manifest.cache}
    filled = {e.output for e in manifest.cache if manifest.cache_update == "in_place"}
    for name in names:
        g, w = got[name].astype(np.float32), want[name]
        if name in filled:      # a buffer holds T+S tokens; what lies beyond is unspecified (GroupQueryAttention)
            g, w = g.take(range(total), axis=time_axes[name]), w.take(range(total), axis=time_axes[name])
        scale = max(1.0, float(np.abs(w).max()))
        err = float(np.abs(g - w).max()) if g.shape == w.shape else float("inf")
        if name == "logits":
            figures["verify_max_abs_logit_error"] = err
        what, allowed = "max |Δ|", tol * scale
        if approximate and g.shape == w.shape:
            what, allowed = "relative RMS error", tol
            err = float(np.sqrt(np.mean((g - w) ** 2)) / max(float(np.std(w.astype(np.float64))), 1e-12))
            if err >= figures.get("verify_worst_relative_rms_error", -1.0):
                figures.update(verify_worst_relative_rms_error=err, verify_worst_output=name)
        if not err <= allowed:
            raise ExportError(f"onnxruntime disagrees with {against} on {step}, output {name}: shape {g.shape} vs "
                              f"{w.shape}, "
                              f"{what} {err:.2e} (allowed {allowed:.1e}); the export is not usable")
    return figures


def _as_laid_out(a: np.ndarray, entry) -> np.ndarray:
    """A PyTorch cache tensor in the folder's layout for ``entry`` (unit axes added where the
    export added them; the values are the same)."""
    if a.ndim == len(entry.shape):
        return a
    batch = a.shape[0]
    return a.reshape(entry.concrete_shape(batch, a.size // max(batch * entry.values_per_token(), 1)))
