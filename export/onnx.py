"""Export a decode-step program to ONNX with the KV cache as graph inputs and outputs.

``to_onnx(mla_or_model, out_dir)`` writes one self-contained folder (``runtime/manifest.py``
describes it): ``model.onnx`` + ``model.onnx.data`` (weights stored once, as external data),
``manifest.json`` and ``tokenizer.json``. A converted ``MLAModel`` exports its step program
(``past_key_values.{i}.latent`` / ``.rope_key`` cache); any other decoder is first turned into
the unconverted baseline (``mla_pass.baseline``, ``past_key_values.{i}.key`` / ``.value``)
through the same capture → match → rewrite path, so every comparison is like for like.

The program is exported with ``torch.onnx.export(dynamo=True)``. By default the cache is
updated in place (``lowering.in_place.to_in_place``: past inputs are preallocated buffers, new tokens are
written with TensorScatter at T = attention_mask length − S, keys past T+S are masked); with
``cache_update="concat"`` present = concat(past, new). In place, the unconverted baseline runs
each site as one com.microsoft ``GroupQueryAttention`` (``lowering.group_query.use_group_query_attention``),
which reads only the first T+S cached tokens, as onnxruntime-genai's export of the same model
does; the manifest's ``notes["attention"]`` says which sites could not (they keep masked SDPA).
Batch, new tokens and past tokens are dynamic (example sizes are ≥ 2 and distinct: size-1 dims
would be specialised). The traced graph is then fused (``export/fusion.py``: RMSNorm, residual
add + RMSNorm, RoPE, layout round trips and sibling projections become onnxruntime's kernels,
as in onnxruntime-genai's export; ``manifest.notes["fused"]`` counts the sites).
After writing, the folder is checked: onnxruntime runs a prefill and a decode step on random
tokens and must agree with PyTorch (fp32: 1e-3 of the largest value on logits and cache), or
the export is refused.
"""
from __future__ import annotations

import copy
import logging
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from mla_pass.export import verify as checks  # a module: to_onnx's own ``verify`` is its flag
from mla_pass.export.common import ExportError, quiet  # noqa: F401  (ExportError: part of to_onnx's API)
from mla_pass.export.quantize import WEIGHT_BITS, WEIGHT_BLOCK, quantize_weights
from mla_pass.export.staging import check_destination, check_stop, staged_folder
from mla_pass.export.translations import translations as _translations  # noqa: F401  (tests use it)
from mla_pass.frontend.capture import non_finite
from mla_pass.lowering import LoweringSettings, StepProgram, lower
from mla_pass.modules.cache import cache_time_axis
from mla_pass.runtime.manifest import CacheEntry, Manifest

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
DTYPES = ("float32", "float16")     # float16: the exported fp32 graph is converted
TARGETS = ("onnxruntime", "tensorrt")    # tensorrt: standard ONNX only (export/tensorrt.py)
DEFAULT_MAX_LENGTH = 2048


class _OnnxStep(nn.Module):
    """The step program with the runtime's input order: ids, mask, positions, *past."""

    def __init__(self, step: nn.Module):
        super().__init__()
        self.step = step

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return tuple(self.step(input_ids, position_ids, attention_mask, *past))


def to_onnx(model: nn.Module, out_dir: str | Path, *, dtype: str = "float32", tokenizer=None,
            max_length: int | None = None, cache_update: str = "in_place", quantize: str | None = None,
            latent_cache: str = "float", prefill: str | None = None, fuse: bool = True, target: str = "onnxruntime",
            verify: bool = True, progress: bool = True) -> Path:
    """Write ``model`` (an ``MLAModel`` or an unconverted decoder) to ``out_dir`` for the runtime.

    Args:
        dtype: ``"float32"`` or ``"float16"`` for weights, activations and cache.
        tokenizer: a Hugging Face tokenizer, a ``tokenizer.json`` path or a folder holding one;
            without it the folder runs on token ids only.
        max_length: prompt + generated tokens the runtime allows (default: the model's
            ``max_position_embeddings``, else 2048).
        cache_update: ``"in_place"`` (past inputs are preallocated buffers that the program
            updates with TensorScatter and returns as present: bound to one buffer, a decode step
            copies nothing) or ``"concat"`` (present = past + new, a copy of the cache per step).
        quantize: ``"int8"`` or ``"int4"`` stores the weights of every MatMul in that many bits,
            one symmetric scale per 32 input channels (onnxruntime's ``MatMulNBits``, as
            onnxruntime-genai's int8 / int4 builds; activations stay float). A tied lm_head gets its
            own quantized copy; the embedding stays fp32.
        latent_cache: ``"int8"`` (converted models only) caches the latent as 8-bit codes with
            one scale per token (``past_key_values.{i}.latent_scale``; stored as uint8 = code + 128);
            ``"int4"`` as 4-bit codes packed two a byte ([B, T, ⌈C/2⌉] uint8, code + 8 per nibble,
            even channels low) with the same scales, unpacked for the same integer attention;
            read by integer attention (``math/absorbed_mqa.integer_latent_attention``, onnxruntime's
            ``MatMulInteger``); rope keys stay float.
        prefill: converted models: ``"decompressed"`` (the default for onnxruntime) runs prompts
            (S > 1) in the decompressed form, K/V expanded from the written latent rows through ONNX
            ``Attention``, and one-token steps absorbed, one ``If`` per site choosing on S;
            ``"absorbed"`` (the TensorRT target's) runs every step absorbed, as one graph.
        fuse: replace RMSNorm, residual add + RMSNorm, RoPE, layout round trips and sibling
            projections by onnxruntime's fused kernels (``export/fusion.py``; found from the
            graph, exact up to fp32 round-off). ``False`` keeps the graph as traced.
        target: ``"onnxruntime"``, or ``"tensorrt"``: standard ONNX only, as TensorRT's parser
            takes it (``export/tensorrt.py``: no com.microsoft op, opset 24, every cache 4-D with
            its tokens on axis −2; checked node by node). It needs the in-place cache and float
            weights and cache.
        verify: run the written model once in onnxruntime against PyTorch.
        progress: show the stage being run (an export of a 135M model takes minutes on 2 cores).
    Returns the folder.
    """
    from mla_pass.model import MLAModel

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    tensorrt = target == "tensorrt"
    if tensorrt and (quantize or latent_cache != "float" or cache_update != "in_place"):
        raise ValueError("target='tensorrt' exports float weights and a float in-place cache: onnxruntime's "
                         "quantized ops (MatMulNBits, MatMulInteger) and a growing cache are not TensorRT's; "
                         "drop quantize / latent_cache / cache_update (TensorRT quantizes at engine build)")
    if tensorrt and prefill == "decompressed":
        raise ValueError("target='tensorrt' exports one absorbed graph (its checker does not take If subgraphs): "
                         "drop prefill='decompressed' or use prefill='absorbed'")
    # GroupQueryAttention is com.microsoft: the baseline keeps masked SDPA (ONNX Attention, no past inputs)
    settings = LoweringSettings(cache_update=cache_update, latent_cache=latent_cache,     # validates all three
                                group_query_attention=not tensorrt,
                                prefill=prefill or ("absorbed" if tensorrt else "decompressed"))
    if quantize is not None and quantize not in WEIGHT_BITS:
        raise ValueError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    if quantize and dtype != "float32":
        raise ValueError(f"{quantize} weights are quantized from a float32 export: use dtype='float32' with "
                         f"quantize={quantize!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if prefill is not None and not isinstance(model, MLAModel):
        raise ValueError(f"prefill={prefill!r} chooses a converted model's prompt form; the original has one "
                         "(drop prefill)")
    if latent_cache != "float" and not isinstance(model, MLAModel):
        raise ValueError(f"latent_cache={latent_cache!r} needs a converted model (mla_pass.convert): the original "
                         "has no latent")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an integer >= 2 (prompt + generated tokens), got {max_length!r}")
    out = Path(out_dir)
    check_destination(out)                    # before any work
    if isinstance(model, MLAModel):
        if not model.can_cache:
            raise ValueError("this converted model cannot decode from a cache (sites left untouched, or its forward "
                             "takes no position_ids), so it has no step program to export")
        program = StepProgram(_absorbed_step(model), model.cache_spec, model.plans, model.vocab_size, "mla")
        source, generation = model.source, model.generation
        mla_config = model.config.to_dict()
    elif isinstance(model, nn.Module):
        from mla_pass.baseline import kv_step_program
        baseline = kv_step_program(model)
        program = StepProgram(baseline.step, baseline.cache_spec, baseline.plans, baseline.vocab_size, "original")
        source, generation = baseline.source, baseline.generation
        mla_config = None
    else:
        raise TypeError(f"expected an MLAModel or a torch decoder, got {type(model).__name__}")

    bad = non_finite(program.gm.named_parameters())
    if bad:
        raise ValueError(f"the program's weights hold NaN or inf ({', '.join(bad[:3])}): an export of it cannot be "
                         "checked, nor be right; re-convert the model or load an earlier checkpoint")
    if any(p.dtype != torch.float32 for p in program.gm.parameters()):
        raise ValueError("export from a float32 model (load or convert it in float32); dtype='float16' converts "
                         "the exported graph itself")
    stage = _Stages(["lowering passes", "torch.onnx.export", *(["fusing"] * fuse),
                     *(["float16"] * (dtype == "float16")), *(["TensorRT's restrictions"] * tensorrt),
                     *(["checking before quantizing"] * bool(verify and quantize)),
                     *([f"{quantize} weights"] * bool(quantize)),
                     *(["checking in onnxruntime"] * verify), "writing"], progress)
    try:
        stage("lowering passes")
        lower(program, settings)
        step, spec, vocab, kind = program.gm, program.cache_spec, program.vocab_size, program.kind
        args, names, shapes = _example(program)
        wrapper = _OnnxStep(step).eval()
        opset = 24 if cache_update == "in_place" else 23          # TensorScatter is opset 24
        with staged_folder(out) as staging:    # written whole beside out, then renamed: no half-written folder
            stage("torch.onnx.export")
            with torch.no_grad(), warnings.catch_warnings(), quiet("torch.onnx"):
                warnings.simplefilter("ignore")
                try:
                    onnx_program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                                     custom_translation_table=_translations(),
                                                     input_names=names["inputs"], output_names=names["outputs"],
                                                     dynamic_shapes=shapes, verbose=False)
                except Exception as e:
                    raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
                onnx_program.save(str(staging / MODEL_FILE), external_data=True)
            _branch_forms(staging / MODEL_FILE, program)
            fused = _fuse(staging / MODEL_FILE, standard=tensorrt) if stage("fusing") else None
            four_d = _caches_for_tensorrt(staging / MODEL_FILE, names) if tensorrt else set()
            if stage("float16"):
                _to_float16(staging / MODEL_FILE)
            if stage("TensorRT's restrictions"):
                import onnx

                from mla_pass.export import tensorrt as trt_profile
                trt_profile.check(onnx.load(str(staging / MODEL_FILE), load_external_data=False))
            has_tokenizer = _write_tokenizer(tokenizer, staging / TOKENIZER_FILE)
            entries = [_cache_entry(t, program.cache_shape(t, -1, -2), "uint8" if _is_int8(t, latent_cache) else dtype,
                                    unit_axis=t.name in four_d) for t in spec]
            eos = generation.get("eos_token_id")
            manifest = Manifest(
                kind=kind, dtype=dtype, vocab_size=vocab, max_length=max_length or _max_length(source),
                cache=entries, eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
                bos_token_id=(source.get("config") or {}).get("bos_token_id"),
                pad_token_id=generation.get("pad_token_id"),
                model_file=MODEL_FILE, tokenizer_file=TOKENIZER_FILE if has_tokenizer else None,
                mla_config=mla_config, source={k: v for k, v in source.items() if k != "config"},
                cache_update=cache_update,
                notes={"exporter": f"torch.onnx.export(dynamo=True, opset {opset})", "torch": torch.__version__,
                       "target": "tensorrt (standard ONNX; every cache 4-D, tokens on axis -2; checked against "
                                 "TensorRT's ONNX restrictions)" if tensorrt else "onnxruntime",
                       "weights": f"{quantize} (MatMulNBits, symmetric, blocks of {WEIGHT_BLOCK}, accuracy level 4; "
                                  "embedding fp32)" if quantize else dtype,
                       "latent_cache": LATENT_CACHE_NOTES.get(latent_cache, dtype)})
            manifest.notes.update(program.notes)        # what the lowering passes report
            if fused is not None:
                manifest.notes["fused"] = fused
            # quantized programs are checked over the model's own text and cache (``verify.self_filled_inputs``): on
            # random ones a deep model is chaotic at some tokens, which says nothing about the export
            checked = checks.self_filled_inputs(wrapper, args, spec, vocab, cache_update) \
                if verify and (quantize or latent_cache != "float") else args
            if stage("checking before quantizing"):
                # the graph as written is held to the float tolerance before onnxruntime's quantizer
                # touches its weights; what the quantizer changes gets the approximate check below
                exact = checks.check_export(staging, manifest, wrapper, checked, dtype)
                manifest.notes.update({k.replace("verify_", f"verify_before_{quantize}_weights_"): v
                                       for k, v in exact.items()})
            if stage(f"{quantize} weights"):
                manifest.notes["quantized"] = quantize_weights(staging / MODEL_FILE, quantize)
            if stage("checking in onnxruntime"):
                manifest.notes.update(checks.check_export(staging, manifest, wrapper, checked, dtype,
                                                          quantized=quantize))
            stage("writing")
            manifest.write(staging)
    except BaseException:         # the line shows where it stopped; nothing is left on disk
        stage.abort()
        raise
    stage.close()
    return out


class _Stages:
    """A progress line over an export's stages: ``stage(name)`` marks the start of ``name`` and
    returns whether that stage runs at all (stages the options skip are not in the list)."""

    def __init__(self, names: list[str], progress: bool):
        from tqdm.auto import tqdm
        self.names = names
        self.bar = tqdm(total=len(names), desc="to_onnx", unit="stage", disable=not progress,
                        bar_format="{desc}({n_fmt}/{total_fmt} stages done, {elapsed})")
        self.started = 0

    def __call__(self, name: str) -> bool:
        check_stop()
        if name not in self.names:
            return False
        self.bar.update(self.started - self.bar.n)          # the previous stage is done
        self.started += 1
        self.bar.set_description(f"to_onnx: {name}")
        return True

    def close(self) -> None:
        self.bar.update(self.started - self.bar.n)
        self.bar.close()

    def abort(self) -> None:
        self.bar.close()


def _absorbed_step(mla) -> nn.Module:
    """The step program with every site in the absorbed form, prompts included: one ONNX graph
    serves prefill and decode, and decode must read the latent cache directly (never expand it)."""
    step = copy.deepcopy(mla.step)
    from mla_pass.modules.latent_attention import LatentAttention
    for m in step.modules():
        if isinstance(m, LatentAttention):
            m.form = "absorbed"
    return step


def _branch_forms(path: Path, program: StepProgram) -> None:
    """Each site that chooses its form on S becomes one If (``export/branches.py``; only the graph
    changes, the weights file is kept), then the count is checked: torch.onnx.export falls back
    to other tracing strategies when the first fails, and one that specialised S would have left
    a single form."""
    import onnx

    from mla_pass.export.branches import branch_forms
    from mla_pass.modules.latent_attention import LatentAttention

    want = sum(isinstance(m, LatentAttention) and m.form == "auto" and m.query_nope_projection is not None
               for m in program.gm.modules())
    model = onnx.load(str(path), load_external_data=False)
    found = branch_forms(model.graph)
    if found:
        onnx.save(model, str(path))
    if found != want:
        raise ExportError(f"the exported graph has {found} If nodes for {want} sites that run prompts decompressed and "
                          "one-token steps absorbed: the exporter specialised the prompt length. Export with "
                          "prefill='absorbed' (one form for every step)")


def _fuse(path: Path, standard: bool = False) -> dict[str, int]:
    """Fuse the fp32 graph in place (before any float16 / int8 conversion, which keep the fused ops);
    ``standard``: standard ONNX ops only (the TensorRT target)."""
    import onnx

    from mla_pass.export.fusion import FUSIONS, STANDARD_FUSIONS, fuse

    model, counts = fuse(onnx.load(str(path)), STANDARD_FUSIONS if standard else FUSIONS, standard=standard)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return counts


def _caches_for_tensorrt(path: Path, names: dict) -> set[str]:
    """Every in-place cache 4-D with its tokens on axis −2 (``export/tensorrt.caches_for_tensorrt``);
    only the graph changes, the weights file is kept → the cache inputs made 4-D."""
    import onnx

    from mla_pass.export.tensorrt import caches_for_tensorrt

    model = onnx.load(str(path), load_external_data=False)
    pairs = list(zip(names["inputs"][3:], names["outputs"][1:]))
    changed = caches_for_tensorrt(model, pairs)
    onnx.save(model, str(path))
    return set(changed)


def _to_float16(path: Path) -> None:
    """Weights, activations, cache and logits in float16 (onnxruntime's converter; the traced graph
    holds float32 constants and casts, so casting the PyTorch program instead would not export)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)


def _example(program: StepProgram):
    """The program's example inputs in the exported order, their names and dynamic axes."""
    ids, mask, pos, past = program.example_inputs()
    spec = program.cache_spec
    batch, total, past_len = (torch.export.Dim.DYNAMIC,) * 3
    new = torch.export.Dim("new_tokens", min=1)      # not 0/1-specialised: a site's form is chosen on S == 1
    shapes = ({0: batch, 1: new}, {0: batch, 1: total}, {0: batch, 1: new},     # *past is one argument
              tuple({0: batch, cache_time_axis(c.kind): past_len} for c in spec))
    names = {"inputs": ["input_ids", "attention_mask", "position_ids"] + [c.name for c in spec],
             "outputs": ["logits"] + [_present_name(c.name) for c in spec]}
    return (ids, mask, pos, *past), names, shapes


LATENT_CACHE_NOTES = {
    "int8": "8-bit (uint8 = code + 128), one scale per token; integer attention (MatMulInteger)",
    "int4": "4-bit, packed two a byte (uint8 [.., ceil(C/2)]: channel 2i in the low nibble, 2i+1 in the high one, "
            "each code + 8; an odd width padded with code 0), one scale per token; unpacked to the 8-bit layout for "
            "the integer attention (MatMulInteger)",
}


def _is_int8(spec, latent_cache: str) -> bool:
    """A quantized latent: its codes are stored as uint8 (8-bit, or two 4-bit codes a byte)."""
    return latent_cache != "float" and spec.kind == "latent"


def _present_name(past_name: str) -> str:
    return past_name.replace("past_key_values.", "present.", 1)


def _cache_entry(spec, stored_shape, dtype: str, unit_axis: bool = False) -> CacheEntry:
    """``stored_shape``: the program's (-1 = batch, -2 = past); ``unit_axis``: the export laid this
    [B, T, C] cache out as [B, 1, T, C] (the TensorRT target)."""
    shape = list(stored_shape)
    if unit_axis:
        shape.insert(1, 1)
    shape = ["batch" if d == -1 else "past" if d == -2 else int(d) for d in shape]
    return CacheEntry(input=spec.name, output=_present_name(spec.name), shape=shape, dtype=dtype,
                      time_axis=shape.index("past"))


def _max_length(source: dict) -> int:
    return int((source.get("config") or {}).get("max_position_embeddings") or DEFAULT_MAX_LENGTH)


def _write_tokenizer(tokenizer, path: Path) -> bool:
    if tokenizer is None:
        return False
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        src = src / TOKENIZER_FILE if src.is_dir() else src
        if not src.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} at {src}: pass the tokenizer object or its folder")
        shutil.copyfile(src, path)
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "save"):
        raise TypeError(f"cannot save {type(tokenizer).__name__} as {TOKENIZER_FILE}: pass a fast Hugging Face "
                        "tokenizer, a tokenizers.Tokenizer, or the path of a tokenizer.json")
    backend.save(str(path))
    return True


