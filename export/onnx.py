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

import contextlib
import copy
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mla_pass.lowering.absorb import absorb_projections
from mla_pass.lowering.group_query import use_group_query_attention
from mla_pass.lowering.in_place import to_in_place
from mla_pass.lowering.int8_latent import CACHE_DTYPES, to_int8_latent
from mla_pass.math.int8_cache import dequantize_per_token
from mla_pass.modules.cache import cache_time_axis
from mla_pass.runtime.manifest import CACHE_UPDATES, CacheEntry, Manifest

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
DTYPES = ("float32", "float16")     # float16: the exported fp32 graph is converted
EXAMPLE = {"batch": 2, "new": 3, "past": 5}     # ≥ 2 and distinct, so none is specialised
DEFAULT_MAX_LENGTH = 2048
INT8_BLOCK = 32                     # input channels per int8 weight scale


class ExportError(RuntimeError):
    pass


class _OnnxStep(nn.Module):
    """The step program with the runtime's input order: ids, mask, positions, *past."""

    def __init__(self, step: nn.Module):
        super().__init__()
        self.step = step

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return tuple(self.step(input_ids, position_ids, attention_mask, *past))


def to_onnx(model: nn.Module, out_dir: str | Path, *, dtype: str = "float32", tokenizer=None,
            max_length: int | None = None, cache_update: str = "in_place", quantize: str | None = None,
            latent_cache: str = "float", fuse: bool = True, verify: bool = True) -> Path:
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
        quantize: ``"int8"`` stores the weights of every MatMul as int8, one scale per 32 input
            channels (onnxruntime's ``MatMulNBits``, as onnxruntime-genai's int8 build; activations
            stay float). A tied lm_head gets its own int8 copy; the embedding stays fp32.
        latent_cache: ``"int8"`` (converted models only) caches the latent as 8-bit codes with
            one scale per token (``past_key_values.{i}.latent_scale``; stored as uint8 = code + 128),
            read by integer attention (``math/absorbed_mqa.integer_latent_attention``, onnxruntime's
            ``MatMulInteger``); rope keys stay float.
        fuse: replace RMSNorm, residual add + RMSNorm, RoPE, layout round trips and sibling
            projections by onnxruntime's fused kernels (``export/fusion.py``; found from the
            graph, exact up to fp32 round-off). ``False`` keeps the graph as traced.
        verify: run the written model once in onnxruntime against PyTorch.
    Returns the folder.
    """
    from mla_pass.model import MLAModel

    if cache_update not in CACHE_UPDATES:
        raise ValueError(f"cache_update must be one of {CACHE_UPDATES}, got {cache_update!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and dtype != "float32":
        raise ValueError("int8 weights are quantized from a float32 export: use dtype='float32' with quantize='int8'")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if latent_cache not in CACHE_DTYPES:
        raise ValueError(f"latent_cache must be one of {CACHE_DTYPES}, got {latent_cache!r}")
    if latent_cache == "int8" and not isinstance(model, MLAModel):
        raise ValueError("latent_cache='int8' needs a converted model (mla_pass.convert): the original has no latent")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new folder or delete it first")
    if isinstance(model, MLAModel):
        if not model.can_cache:
            raise ValueError("this converted model cannot decode from a cache (sites left untouched, or its forward "
                             "takes no position_ids), so it has no step program to export")
        kind, step, spec, plans = "mla", _absorbed_step(model), model.cache_spec, model.plans
        vocab, source, generation = model.vocab_size, model.source, model.generation
        mla_config = model.config.to_dict()
    elif isinstance(model, nn.Module):
        from mla_pass.baseline import kv_step_program
        program = kv_step_program(model)
        kind, step, spec, plans = "original", program.step, program.cache_spec, program.plans
        vocab, source, generation = program.vocab_size, program.source, program.generation
        mla_config = None
    else:
        raise TypeError(f"expected an MLAModel or a torch decoder, got {type(model).__name__}")

    if any(p.dtype != torch.float32 for p in step.parameters()):
        raise ValueError("export from a float32 model (load or convert it in float32); dtype='float16' converts "
                         "the exported graph itself")
    attention = "ONNX Attention (masked SDPA)" if kind == "original" else None
    if cache_update == "in_place":
        step = to_in_place(step if kind == "mla" else copy.deepcopy(step))   # the mla step is a private copy
        if kind == "original":     # as onnxruntime-genai exports it: one GroupQueryAttention per site
            refused = use_group_query_attention(step)
            attention = f"com.microsoft GroupQueryAttention at {len(plans) - len(refused)} of {len(plans)} sites" + \
                "".join(f"; site {i}: masked SDPA, {why}" for i, why in sorted(refused.items()))
    if latent_cache == "int8":
        step, spec = to_int8_latent(step, spec)
    args, names, shapes = _example(step, spec, plans, vocab, torch.float32, cache_update)
    absorbed = None
    if kind == "mla":     # W_uk and W_uv folded into the query and output projections
        ids, mask, pos, *past = args
        absorbed = absorb_projections(step, (ids, pos, mask, *past))
    wrapper = _OnnxStep(step).eval()
    opset = 24 if cache_update == "in_place" else 23          # TensorScatter is opset 24
    with tempfile.TemporaryDirectory() as tmp:   # written whole, then moved: a failed export leaves no folder
        staging = Path(tmp)
        with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx"):
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                            custom_translation_table=_translations(),
                                            input_names=names["inputs"], output_names=names["outputs"],
                                            dynamic_shapes=shapes, verbose=False)
            except Exception as e:
                raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
            program.save(str(staging / MODEL_FILE), external_data=True)
        fused = _fuse(staging / MODEL_FILE) if fuse else None
        if dtype == "float16":
            _to_float16(staging / MODEL_FILE)
        has_tokenizer = _write_tokenizer(tokenizer, staging / TOKENIZER_FILE)
        entries = [_cache_entry(t, plans[t.site], "uint8" if _is_int8(t, latent_cache) else dtype) for t in spec]
        eos = generation.get("eos_token_id")
        manifest = Manifest(
            kind=kind, dtype=dtype, vocab_size=vocab, max_length=max_length or _max_length(source),
            cache=entries, eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            bos_token_id=(source.get("config") or {}).get("bos_token_id"), pad_token_id=generation.get("pad_token_id"),
            model_file=MODEL_FILE, tokenizer_file=TOKENIZER_FILE if has_tokenizer else None,
            mla_config=mla_config, source={k: v for k, v in source.items() if k != "config"},
            cache_update=cache_update,
            notes={"exporter": f"torch.onnx.export(dynamo=True, opset {opset})", "torch": torch.__version__,
                   "weights": f"int8 (MatMulNBits, symmetric, blocks of {INT8_BLOCK}, accuracy level 4; "
                              "embedding fp32)" if quantize else dtype,
                   "latent_cache": "8-bit (uint8 = code + 128), one scale per token; integer attention "
                                   "(MatMulInteger)" if latent_cache == "int8" else dtype})
        if attention:
            manifest.notes["attention"] = attention
        if absorbed is not None:
            manifest.notes["absorbed_projections"] = absorbed
        if fused is not None:
            manifest.notes["fused"] = fused
        # int8 programs are checked over the model's own text and cache (``_self_filled``): on
        # random ones a deep model is chaotic at some tokens, which says nothing about the export
        checked = _self_filled(wrapper, args, spec, vocab, cache_update) \
            if verify and (quantize or latent_cache == "int8") else args
        if verify and quantize:
            # the graph as written is held to the float tolerance before onnxruntime's quantizer
            # touches its weights; what the quantizer changes gets the approximate check below
            exact = _verify(staging, manifest, wrapper, checked, dtype)
            manifest.notes.update({k.replace("verify_", "verify_before_int8_weights_"): v for k, v in exact.items()})
        if quantize == "int8":
            manifest.notes["quantized"] = _to_int8_weights(staging / MODEL_FILE)
        if verify:
            manifest.notes.update(_verify(staging, manifest, wrapper, checked, dtype, quantized=bool(quantize)))
        manifest.write(staging)
        out.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            shutil.move(str(f), out / f.name)
    return out


@contextlib.contextmanager
def _quiet(logger_name: str):
    """The exporter logs a line per optional library it does not find (torchvision): not ours to show."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _absorbed_step(mla) -> nn.Module:
    """The step program with every site in the absorbed form, prompts included: one ONNX graph
    serves prefill and decode, and decode must read the latent cache directly (never expand it)."""
    step = copy.deepcopy(mla.step)
    from mla_pass.modules.latent_attention import LatentAttention
    for m in step.modules():
        if isinstance(m, LatentAttention):
            m.form = "absorbed"
    return step


def _fuse(path: Path) -> dict[str, int]:
    """Fuse the fp32 graph in place (before any float16 / int8 conversion, which keep the fused ops)."""
    import onnx

    from mla_pass.export.fusion import fuse

    model, counts = fuse(onnx.load(str(path)))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return counts


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


def _translations() -> dict:
    """cache_write → ONNX TensorScatter and group_query_attention → com.microsoft
    GroupQueryAttention (onnxruntime updates either in place when past and present are bound to
    the same buffer); matmul_integer → MatMulInteger."""
    from onnxscript import ir, values

    import mla_pass.ops.matmul_integer  # noqa: F401  (registers mla_pass::matmul_integer)

    op24 = values.Opset("", 24)
    # onnx knows no com.microsoft schemas, and the exporter needs one to emit a node
    gqa_op = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _group_query_attention_schema())

    def cache_write(buffer, new, write_index, axis: int):
        return op24.TensorScatter(buffer, new, write_index, axis=axis)

    def group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                              attention_bias, query_seqlens, num_heads: int, kv_num_heads: int, scale: float,
                              softcap: float):
        # do_rotary=0: the graph has already rotated q and k
        return gqa_op(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, None, None, None,
                      attention_bias, None, None, None, None, None, query_seqlens,
                      num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, softcap=softcap)

    def matmul_integer(a, b, a_zero_point: int, b_zero_point: int):
        # a nonzero zero point belongs to a uint8 operand (mla_pass.ops.matmul_integer checks it)
        zp = [op24.Constant(value=ir.tensor(np.array(z, np.uint8))) if z else None for z in (a_zero_point, b_zero_point)]
        return op24.MatMulInteger(a, b, *zp)

    return {torch.ops.mla_pass.cache_write.default: cache_write,
            torch.ops.mla_pass.group_query_attention.default: group_query_attention,
            torch.ops.mla_pass.matmul_integer.default: matmul_integer}


def _group_query_attention_schema():
    """The part of onnxruntime's GroupQueryAttention signature that ``gqa_op`` uses (inputs in
    onnxruntime's order, up to query_seqlens; the unused optional ones are left empty)."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
             "k_norm_weight", "query_seqlens"]
    types = {"seqlens_k": "M", "total_sequence_length": "M", "query_seqlens": "M", "position_ids": "I",
             "k_scale": "T", "v_scale": "T"}
    inputs = [OpSchema.FormalParameter(n, types.get(n, "T"), param_option=optional if i > 2 and n not in
                                       ("seqlens_k", "total_sequence_length") else OpSchema.FormalParameterOption.Single)
              for i, n in enumerate(names)]
    outputs = [OpSchema.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")]
    attr = OpSchema.AttrType
    attributes = [OpSchema.Attribute("num_heads", attr.INT), OpSchema.Attribute("kv_num_heads", attr.INT),
                  OpSchema.Attribute("scale", attr.FLOAT, required=False),
                  OpSchema.Attribute("softcap", attr.FLOAT, required=False)]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs, attributes=attributes,
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                                      ("I", ["tensor(int64)"], "")])


def _example(step, spec, plans, vocab, dtype, cache_update):
    b, s, t = EXAMPLE["batch"], EXAMPLE["new"], EXAMPLE["past"]
    buffer = t + s + 4 if cache_update == "in_place" else t      # preallocated beyond T+S
    gen = torch.Generator().manual_seed(0)
    device = next(step.parameters()).device
    ids = torch.randint(0, vocab, (b, s), generator=gen).to(device)
    mask = torch.ones(b, t + s, dtype=torch.long, device=device)
    mask[1, :2] = 0                                              # one left-padded row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]
    int8_sites = {c.site for c in spec if c.kind == "latent_scale"}
    past = [_example_cache(plans[c.site].cache_shape(c.kind, b, buffer), c.kind, c.site in int8_sites, gen, device, dtype)
            for c in spec]
    batch, new, total, past_len = (torch.export.Dim.DYNAMIC,) * 4
    shapes = ({0: batch, 1: new}, {0: batch, 1: total}, {0: batch, 1: new},     # *past is one argument
              tuple({0: batch, cache_time_axis(c.kind): past_len} for c in spec))
    names = {"inputs": ["input_ids", "attention_mask", "position_ids"] + [c.name for c in spec],
             "outputs": ["logits"] + [_present_name(c.name) for c in spec]}
    return (ids, mask, pos, *past), names, shapes


@torch.no_grad()
def _self_filled(wrapper: nn.Module, args: tuple, spec, vocab: int, cache_update: str) -> tuple:
    """The example step (its mask and positions) over text and a past the program itself wrote
    (``_model_text``): a prefill of the text's first T tokens from an empty cache gives the past,
    the last S are the step's new tokens."""
    ids, mask, pos, *past = args
    t = mask.shape[1] - ids.shape[1]
    text = _model_text(wrapper, args, spec, vocab, cache_update)
    present = _prefill(wrapper, text[:, :t], mask, past, spec, cache_update)[1:]
    return (text[:, t:].contiguous(), mask, pos, *present)


@torch.no_grad()
def _model_text(wrapper: nn.Module, args: tuple, spec, vocab: int, cache_update: str) -> torch.Tensor:
    """[B, T+S] tokens: each row starts from one random token (after its left padding) and
    continues greedily. Random tokens would put a deep model where int8 weights throw its logits
    around (SmolLM2 at d_kv=32: relative RMS error of the logits 1.05 on random ids, 0.07 over
    real text); its own continuation is text the model finds plausible, and needs no tokenizer."""
    ids, mask, pos, *past = args
    total = mask.shape[1]
    text = torch.randint(0, vocab, (ids.shape[0], total), generator=torch.Generator().manual_seed(1)).to(ids.device)
    first = mask.argmax(-1)                 # each row's first real token
    for j in range(1, total):
        greedy = _prefill(wrapper, text[:, :j], mask, past, spec, cache_update)[0][:, -1].argmax(-1)
        text[:, j] = torch.where(first < j, greedy, text[:, j])
    return text


def _prefill(wrapper: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, past: list, spec, cache_update: str):
    """The step program on ``tokens`` (the first n columns of ``mask``) from an empty cache."""
    n = tokens.shape[1]
    if cache_update == "in_place":          # the same buffers, zeroed: the prefill writes tokens [0, n)
        empty = [torch.zeros_like(p) for p in past]
    else:                                   # concat: a past of length 0
        empty = [p.narrow(cache_time_axis(c.kind), 0, 0) for p, c in zip(past, spec)]
    return wrapper(tokens, mask[:, :n], (mask[:, :n].cumsum(-1) - 1).clamp(min=0), *empty)


def _example_cache(shape, kind: str, int8_latent: bool, gen, device, dtype) -> torch.Tensor:
    if kind == "latent_scale":       # an int8 latent's per-token scales: positive
        return (torch.rand(shape, generator=gen) * 0.02 + 0.005).to(device, dtype)
    if kind == "latent" and int8_latent:        # 8-bit codes + 128
        return torch.randint(1, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    return (torch.randn(shape, generator=gen) * 0.5).to(device, dtype)


def _is_int8(spec, latent_cache: str) -> bool:
    return latent_cache == "int8" and spec.kind == "latent"


def _present_name(past_name: str) -> str:
    return past_name.replace("past_key_values.", "present.", 1)


def _cache_entry(spec, plan, dtype: str) -> CacheEntry:
    shape = list(plan.cache_shape(spec.kind, -1, -2))
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


def _to_int8_weights(path: Path) -> dict[str, int]:
    """Weight-only int8 (onnxruntime's ``MatMulNBits``, 8 bits, symmetric, one scale per block of
    32 input channels; accuracy level 4 = int8 dot products on CPU), as onnxruntime-genai's
    ``-p int8`` build quantizes (same bits, block, symmetry, accuracy level; its lm_head too, its
    embedding stays fp32). Activations stay float: onnxruntime's dynamic quantization (per-tensor
    uint8 activations) measured top-1 agreement of 42% with the fp32 SmolLM2 on random tokens,
    this 94%. Returns how many weights were quantized and how many tied ones got their own copy."""
    import onnx

    MatMulNBitsQuantizer = _import_quantizer()
    model = onnx.load(str(path))
    untied = _untie_transposed_weights(model.graph)
    with _quiet("root"), _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4)
        quantizer.process()
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    quantized = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
    return {"int8_matmuls": quantized, "untied": untied}


def _import_quantizer():
    """onnxruntime's ``MatMulNBitsQuantizer``, imported without its side effect: the module calls
    ``logging.basicConfig(level=INFO)``, after which every later export in the process printed
    hundreds of onnxscript INFO lines through the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    root.handlers[:], root.level = handlers, level
    return MatMulNBitsQuantizer


def _untie_transposed_weights(graph) -> int:
    """Give every ``MatMul(x, Transpose(W))`` over a float initializer W its own transposed copy.

    A tied lm_head is traced as ``logits = h · Transpose(E)`` over the embedding E that the
    token Gather also reads; ``MatMulNBitsQuantizer`` only quantizes a MatMul whose weight is an
    initializer, so without this the largest matrix of a small model (SmolLM2: 49,152 × 576)
    stayed fp32. E itself stays for the Gather (the quantizer's Gather is 4-bit only), so the
    lm_head costs an int8 copy on disk (SmolLM2: 28 MB of codes + 3.5 MB of scales). Returns
    the number of MatMuls rewired."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    rewired, copies = 0, {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        weight = inits[t.input[0]]
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        if len(weight.dims) != 2 or perm not in ([], [[1, 0]]) or \
                weight.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        if t.output[0] not in copies:
            name = f"{weight.name}.transposed"
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), name))
            copies[t.output[0]] = name
        node.input[1] = copies[t.output[0]]
        readers[t.output[0]] -= 1
        rewired += 1
    outputs = {o.name for o in graph.output}
    for out in copies:                # a Transpose nobody reads any more
        if readers[out] == 0 and out not in outputs:
            graph.node.remove(producers[out])
    return rewired


def _verify(folder: Path, manifest: Manifest, wrapper: nn.Module, args: tuple, dtype: str,
            quantized: bool = False) -> dict[str, float | str]:
    """Run the written model in onnxruntime on the example step; refuse the export on mismatch.
    Returns the figures for the manifest's notes: the largest |Δ| of the logits and, for an
    approximate (int8) program, its worst output's relative RMS error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3      # no "in-place not activated" notes: nothing is bound here
    session = ort.InferenceSession(str(folder / manifest.model_file), options, providers=["CPUExecutionProvider"])
    names = ["input_ids", "attention_mask", "position_ids"] + [e.input for e in manifest.cache]
    feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
    if dtype == "float16":
        feeds.update({e.input: feeds[e.input].astype(np.float16) for e in manifest.cache if e.dtype == "float16"})
    got = session.run(None, feeds)
    with torch.no_grad():
        want = [t.float().cpu().numpy() for t in wrapper(*args)]
    # float programs: max |Δ| relative to the largest value (fp32: 1e-3, since round-off grows
    # over a real model's depth — SmolLM2's 30 layers reach ~3e-4 on the cache — while a wrong
    # program is off by O(1)). int8 weights or an int8 latent cache: int8 weights move logits and
    # cache (their quality change is measured on real text, not asserted here), and a code
    # flipped at a rounding tie (cache, the integer attention's 8-bit queries and weights) is a
    # change later layers carry. Those are judged by the RMS error relative to the output's
    # spread (its std, so a shared offset such as the logits' mean cannot hide an error), ≤ 0.5,
    # where an unrelated output is ≈ √2; exactness of the int8 program is tests/test_int8_cache.py's
    # job (≤ 1e-4, tiny model). An int8 latent is compared as the values it stands for.
    int8_outputs = {e.output for e in manifest.cache if e.dtype in ("int8", "uint8")}
    approximate = quantized or bool(int8_outputs)
    tol = 0.5 if approximate else 1e-3 if dtype == "float32" else 2e-2
    names = ["logits"] + [e.output for e in manifest.cache]
    got, want = dict(zip(names, got)), dict(zip(names, want))
    for name in int8_outputs:                   # its scales are the output named <latent>_scale
        codes, scales = (got[name], want[name]), (got[name + "_scale"], want[name + "_scale"])
        if codes[0].shape == codes[1].shape and scales[0].shape == scales[1].shape:   # else: a shape error below
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
            raise ExportError(f"onnxruntime disagrees with PyTorch on output {name}: shape {g.shape} vs {w.shape}, "
                              f"{what} {err:.2e} (allowed {allowed:.1e}); the export is not usable")
    return figures


