"""A converted model → a Hugging Face-style folder that vLLM serves with its MLA attention.

Per layer the folder holds, under ``model.layers.{i}.self_attn.`` (the base family's names for
everything else):

- ``q_nope_proj`` [N·Dh, d]: the unrotated query of every head over all its dims (the fitted
  2×2 maps of dropped pairs folded in), the part scored against the latent's keys;
- ``q_rope_proj`` [N·R, d] and ``q_rope_scale`` [N, R]: each head's pre-rotation query on the
  kept rope slots, and the per-head weight of each rotated slot (the mixing U_k[g(h), j]);
- ``kv_a_proj`` [L + R, d]: the latent down-projection, then the shared rope key (DeepSeek's
  ``kv_a_proj_with_mqa`` without its norm); ``rope_freq`` [R/2]: each slot's inverse frequency;
- ``kv_b_proj`` [N·(Dh + Dv), L]: per query head its kv group's key and value up-projections
  (vLLM's layout: keys first), which vLLM absorbs for decode;
- ``v_bias`` [N·Dv] (where the values had a bias) and ``o_proj`` as the source has it.

Zero rows and columns pad every layer to one latent width L and rope width R (vLLM takes one
per model, and CPU_MLA / FlashMLA only 512 + 64); zeros change no score and no output, so the
export stays exact. A key bias is dropped: it adds the same q·b to every score of a query, which
softmax ignores. ``config.json`` says all of this under ``mla_pass``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common import ExportError
from ..staging import check_destination, staged_folder
from .folder import ARCHITECTURE, FORMAT_VERSION, WEIGHTS_FILE

FAMILIES = ("llama", "mistral", "qwen2")     # computed by vLLM's Llama decoder with our attention
LAYOUTS = {          # name → (latent width, rope width) every layer is padded to; None: see padded_widths
    "deepseek": (512, 64),
    "compact": None,
}
HEAD_SIZES = (320, 512, 576)    # the latent + rope widths vLLM's MLA layer takes (MLACommonBackend, vLLM 0.32)
LAYOUT_NOTES = {
    "deepseek": "latent 512 + rope 64 = head size 576, the split vLLM's CPU_MLA, FlashMLA and every MLA backend take",
    "compact": "the smallest head size vLLM's MLA takes (320, 512 or 576) holding the widest layer, split at the "
               "widest rope part: Triton MLA on GPUs; on CPU the plugin decodes it in torch (CPU_MLA's C++ kernel "
               "takes 512 + 64 only)",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNSUPPORTED_ROPE = ("dynamic", "longrope")   # their frequencies change with the sequence length


@dataclass(frozen=True)
class Widths:
    latent: int          # L: every layer's latent padded to this
    rope: int            # R: every layer's rope keys padded to this (values; R/2 slots)


def to_vllm(model, out_dir: str | Path, *, layout: str = "deepseek", dtype: str | None = None,
            tokenizer=None, verify: bool = True) -> Path:
    """Write ``model`` (an ``MLAModel``) as a folder vLLM serves with MLA attention, through the
    mla-pass plugin (``pip install mla-pass`` in vLLM's environment registers it).

    Args:
        layout: ``"deepseek"`` pads every layer to latent 512 + rope 64 (vLLM's CPU_MLA and
            FlashMLA take only that split); ``"compact"`` to the smallest head size vLLM's MLA
            takes (320, 512 or 576) that holds the widest layer, split at its rope part (Triton MLA;
            on CPU the plugin's torch decode). Either is exact.
        dtype: the weights' dtype (``"float32"``, ``"float16"``, ``"bfloat16"``); default: the model's.
        tokenizer: a Hugging Face tokenizer, or the folder / ``tokenizer.json`` path of one;
            without it vLLM needs ``skip_tokenizer_init=True`` and token ids.
        verify: before the folder is published, run it through ``reference.py`` (vLLM's MLA math in
            plain torch, prefill and decode forms) against the model's own logits.
    Returns the folder (written whole or not at all; never over an existing non-empty folder).
    """
    from mla_pass.model import MLAModel

    if not isinstance(model, MLAModel):
        raise ExportError(f"export for vLLM needs a converted model (an MLAModel from mla_pass.convert or "
                          f"mla_pass.load), got {type(model).__name__}: an unconverted model has no latent cache "
                          "for vLLM's MLA attention to hold; serve it with vLLM directly, or convert it first")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be None or one of {sorted(DTYPES)}, got {dtype!r}")
    check_destination(out_dir)                   # before any work
    base = check_servable(model)
    widths = padded_widths(model, layout)
    inv_freq, scaling = rotary_frequencies(model, base)
    tensors = checkpoint_tensors(model, widths, inv_freq)
    cast = DTYPES[dtype] if dtype else next(model.program.parameters()).dtype
    tensors = {k: v.to(cast).contiguous() for k, v in tensors.items()}
    config = vllm_config(model, base, widths, layout, scaling, cast, tensors)
    from safetensors.torch import save_file
    with staged_folder(out_dir) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "producer": "mla-pass"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (staging / "generation_config.json").write_text(json.dumps(generation_config(model), indent=2))
        write_tokenizer(tokenizer, staging)
        if verify:
            verify_folder(staging, model)
    return Path(out_dir)


@torch.no_grad()
def verify_folder(folder: Path, model, tokens: int = 12) -> float:
    """The folder's logits (both forms of ``reference.py``, in float32) against ``model``'s on
    random tokens → the worst relative error; an ``ExportError`` above the dtype's tolerance."""
    from .reference import FORMS, reference_model

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (2, tokens), generator=gen)
    want = model(ids).float()
    stored = json.loads((folder / "config.json").read_text())["dtype"]
    tolerance = 1e-4 if stored == "float32" else 3e-2
    worst = 0.0
    for form in FORMS:
        got = reference_model(folder, form, dtype=torch.float32)(ids).logits.float()
        worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp(min=1e-6)))
    if worst > tolerance:
        raise ExportError(f"the exported folder's logits differ from the converted model's by {worst:.2e} (relative "
                          f"to the largest logit; tolerance {tolerance:.0e}): the export is wrong, please report it")
    return worst


def check_servable(model) -> dict:
    """The base config of a model the plugin serves, or an ``ExportError`` saying why not."""
    source = model.source or {}
    config = source.get("config") or {}
    family = config.get("model_type")
    if source.get("kind") != "transformers" or family not in FAMILIES:
        raise ExportError(f"the vLLM plugin serves converted {', '.join(FAMILIES)} models (vLLM's Llama decoder "
                          f"with latent attention); this one is {family or source.get('class')!r}: export it with "
                          "to_onnx instead")
    if model.untouched_sites:
        raise ExportError(f"{len(model.untouched_sites)} attention site(s) were left untouched (best_effort): "
                          "vLLM needs every layer in latent form; convert without best_effort")
    window = config.get("sliding_window")
    if window is not None and config.get("use_sliding_window", True) and \
            window < int(config.get("max_position_embeddings") or 0):
        raise ExportError(f"the model attends within a sliding window of {window} tokens, which vLLM's MLA "
                          "attention does not take")
    layers = int(config.get("num_hidden_layers", -1))
    if len(model.plans) != layers:
        raise ExportError(f"found {len(model.plans)} converted attention sites for {layers} layers")
    for i, plan in sorted(model.plans.items()):
        if plan.layer != f"model.layers.{i}.self_attn":
            raise ExportError(f"site {i} is {plan.layer}, not model.layers.{i}.self_attn: not a {family} decoder")
        why = ("its keys are RMS-normalised per head" if plan.key_norm else
               "its scores are soft-capped" if plan.softcap else None)
        if why:
            raise ExportError(f"{plan.layer}: {why}, which the plugin's attention does not compute")
        pairs = plan.rope_pairs
        half = len(pairs)
        if plan.rope_slots and any(list(p) != [k, k + half] for k, p in enumerate(pairs)):
            raise ExportError(f"{plan.layer}: its rotary pairs are not Hugging Face's rotate_half split "
                              "(dims k and k + D/2), the rotation the plugin applies")
    return config


def padded_widths(model, layout: str) -> Widths:
    widest = Widths(max(p.latent_dim for p in model.plans.values()), max(p.rope_width for p in model.plans.values()))
    fixed = LAYOUTS[layout]
    if fixed is None:
        rope = max(widest.rope, 2)                               # one slot at least: vLLM wants a rope part
        fits = [size for size in HEAD_SIZES if size >= widest.latent + rope]
        if not fits:
            raise ExportError(f"the widest layer caches latent {widest.latent} + rope {widest.rope} values, more than "
                              f"vLLM's largest MLA head size {HEAD_SIZES[-1]}: convert at a smaller budget")
        return Widths(fits[0] - rope, rope)
    if widest.latent > fixed[0] or widest.rope > fixed[1]:
        raise ExportError(f"the widest layer caches latent {widest.latent} + rope {widest.rope} values, more than "
                          f"the {layout} layout's {fixed[0]} + {fixed[1]}: convert with "
                          f"MLAConfig(kv_budget=..., max_rope_width={fixed[1]}) (--max-rope-width {fixed[1]}), "
                          "or use layout='compact'")
    return Widths(*fixed)


def rotary_frequencies(model, base: dict) -> tuple[torch.Tensor, float]:
    """The source's inverse frequencies (the converted program's own buffer) and attention factor."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = dict(base)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    rope_type = params.get("rope_type", "default")
    if rope_type in UNSUPPORTED_ROPE:
        raise ExportError(f"rope_type {rope_type!r} changes its frequencies with the sequence length; the plugin "
                          "rotates with fixed ones")
    scaling = 1.0
    if rope_type != "default":
        _, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    buffers = [t for name, t in model.program.state_dict().items() if name.endswith("rotary_emb.inv_freq")]
    if not buffers:
        raise ExportError("the converted program holds no rotary_emb.inv_freq buffer to take the frequencies from")
    return buffers[0].detach().float().cpu(), float(scaling)


def checkpoint_tensors(model, widths: Widths, inv_freq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every weight of the folder, by the names the plugin loads."""
    state = model.program.state_dict()
    tied = bool(model.source["config"].get("tie_word_embeddings", False))
    out = {}
    for name, t in state.items():
        if not name.startswith("model.") or ".self_attn." in name or "rotary_emb" in name:
            continue
        hf = name[len("model."):]
        if tied and hf == "lm_head.weight":
            continue                                   # vLLM ties it to the embedding
        out[hf] = t.detach()
    if tied and "model.embed_tokens.weight" not in out:     # a captured program may keep the tied one as lm_head only
        out["model.embed_tokens.weight"] = state["model.lm_head.weight"].detach()
    left = [n for n in state if ".self_attn." in n and not n.endswith((".q_proj.weight", ".q_proj.bias",
                                                                          ".o_proj.weight", ".o_proj.bias"))]
    if left:
        raise ExportError(f"attention weights the plugin does not compute: {left[:3]}")
    for i, plan in sorted(model.plans.items()):
        attn = model.program.get_submodule(f"mla.{i}")
        prefix = f"model.{plan.layer}."
        q_weight = state[prefix + "q_proj.weight"]
        q_bias = state.get(prefix + "q_proj.bias")
        out.update({f"{plan.layer}.{k}": v for k, v in latent_layer_tensors(
            plan, attn, q_weight, q_bias, widths, inv_freq).items()})
        out[f"{plan.layer}.o_proj.weight"] = state[prefix + "o_proj.weight"].detach()
        if prefix + "o_proj.bias" in state:
            out[f"{plan.layer}.o_proj.bias"] = state[prefix + "o_proj.bias"].detach()
    return out


@torch.no_grad()
def latent_layer_tensors(plan, attn, q_weight, q_bias, widths: Widths, inv_freq) -> dict[str, torch.Tensor]:
    """One layer's latent-attention weights in the plugin's names (see the module docstring)."""
    n, dh, dv, d = plan.n_heads, plan.head_dim, plan.value_dim, plan.hidden
    L, R, C, S2 = widths.latent, widths.rope, plan.latent_dim, plan.rope_width
    f32 = dict(dtype=torch.float32)
    wq = q_weight.float().reshape(n, dh, d)
    bq = q_bias.float().reshape(n, dh) if q_bias is not None else None
    # the nope query: q_nope[h, i] = mix0[h, i]·q[h, i] + mix1[h, i]·q[h, partner[h, i]], folded into the weights
    if attn.query_nope_mix is None:
        fold = torch.eye(dh, **f32).repeat(n, 1, 1)
    else:
        mix = attn.query_nope_mix.detach().float()
        rows = torch.arange(dh)
        fold = torch.zeros(n, dh, dh, **f32)
        fold[:, rows, rows] += mix[..., 0]
        fold.scatter_add_(2, attn.query_nope_partner[..., None], mix[..., 1:2])
    tensors = {"q_nope_proj.weight": torch.einsum("hij,hjd->hid", fold, wq).reshape(n * dh, d)}
    if bq is not None:
        tensors["q_nope_proj.bias"] = torch.einsum("hij,hj->hi", fold, bq).reshape(n * dh)
    # the rope query: each head's dims of the kept slots, before rotation; padded slots stay 0
    dims = attn.rope_value_dims
    q_rope = torch.zeros(n, R, d, **f32)
    q_rope[:, :S2] = wq[:, dims]
    tensors["q_rope_proj.weight"] = q_rope.reshape(n * R, d)
    if bq is not None:
        b = torch.zeros(n, R, **f32)
        b[:, :S2] = bq[:, dims]
        tensors["q_rope_proj.bias"] = b.reshape(n * R)
    scale = torch.zeros(n, R, **f32)
    if attn.rope_query_mix is not None:
        scale[:, :S2] = attn.rope_query_mix.float()
    tensors["q_rope_scale"] = scale
    # the latent and the shared rope key, one projection like DeepSeek's kv_a_proj_with_mqa
    kv_a = torch.zeros(L + R, d, **f32)
    kv_a[:C] = attn.down.float()
    if attn.rope_key is not None:
        kv_a[L:L + S2] = attn.rope_key.weight.float()
    tensors["kv_a_proj.weight"] = kv_a
    if plan.key_bias:          # only the rope key's share: the latent's keys drop theirs (see the docstring)
        b = torch.zeros(L + R, **f32)
        if attn.rope_key is not None:
            b[L:L + S2] = attn.rope_key.bias.float()
        tensors["kv_a_proj.bias"] = b
    freq = torch.zeros(R // 2, **f32)
    freq[:S2 // 2] = inv_freq[[k for k, _ in plan.rope_slots]]
    tensors["rope_freq"] = freq
    # per query head its group's up-projections, keys first; padded latent columns are 0
    group = attn.kv_head_of_query
    kv_b = torch.zeros(n, dh + dv, L, **f32)
    kv_b[:, :dh, :C] = attn.up_key.float()[group]
    kv_b[:, dh:, :C] = attn.up_value.float()[group]
    tensors["kv_b_proj.weight"] = kv_b.reshape(n * (dh + dv), L)
    if attn.value_bias is not None:
        tensors["v_bias"] = attn.value_bias.float()[group].reshape(n * dv)
    return tensors


def vllm_config(model, base: dict, widths: Widths, layout: str, scaling: float, dtype: torch.dtype,
                tensors: dict[str, torch.Tensor]) -> dict:
    """config.json: the base family's fields, DeepSeek's MLA fields (vLLM picks MLA attention by
    ``model_type`` and ``kv_lora_rank``), and what the plugin reads under ``mla_pass``."""
    plans = [model.plans[i] for i in sorted(model.plans)]
    first = plans[0]
    itemsize = torch.empty((), dtype=dtype).element_size()
    head = widths.latent + widths.rope
    config = {k: v for k, v in base.items() if k not in ("head_dim", "architectures", "model_type", "dtype",
                                                           "torch_dtype", "quantization_config", "_name_or_path")}
    config.update({
        "architectures": [ARCHITECTURE],
        "model_type": "deepseek_v2",
        "dtype": str(dtype).removeprefix("torch."),
        "kv_lora_rank": widths.latent,
        "qk_rope_head_dim": widths.rope,
        "qk_nope_head_dim": first.head_dim,
        "v_head_dim": first.value_dim,
        "q_lora_rank": None,
        "first_k_dense_replace": int(base.get("num_hidden_layers", len(plans))),
        "mla_pass": {
            "format_version": FORMAT_VERSION,
            "base_model_type": base["model_type"],
            "layout": layout,
            "layout_note": LAYOUT_NOTES[layout],
            "scales": [p.scale for p in plans],
            "rope_scaling_factor": scaling,
            "query_bias": "model.layers.0.self_attn.q_nope_proj.bias" in tensors,
            "output_bias": "model.layers.0.self_attn.o_proj.bias" in tensors,
            "value_bias": "model.layers.0.self_attn.v_bias" in tensors,
            "key_bias": "model.layers.0.self_attn.kv_a_proj.bias" in tensors,
            "latent_widths": [p.latent_dim for p in plans],
            "rope_widths": [p.rope_width for p in plans],
            "padding": f"zeros to latent {widths.latent} + rope {widths.rope} per layer (exact: zero latent "
                       "channels and rope slots add nothing to any score or output); key biases dropped (softmax "
                       "ignores a constant per query)",
            "cache_values_per_token_per_layer": head,
            "cache_bytes_per_token": len(plans) * head * itemsize,
            "stated_cache_values_per_token": sum(p.latent_dim + p.rope_width for p in plans),
            "original_cache_values_per_token": sum(2 * p.n_kv_heads * p.head_dim for p in plans),
            "mla_config": model.config.to_dict(),
            "base_config": base,
        },
    })
    return config


def generation_config(model) -> dict:
    gen = {k: v for k, v in (model.generation or {}).items() if k in ("eos_token_id", "pad_token_id", "bos_token_id")
           and v is not None}
    return {"_from_model_config": True, **gen}


def write_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer files vLLM's ``AutoTokenizer`` reads: saved from a tokenizer object, or copied
    (``tokenizer.json`` plus the ``tokenizer_config.json`` beside it, if any) from a path."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        src = src / "tokenizer.json" if src.is_dir() else src
        if not src.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {src}: pass the tokenizer object or its folder")
        shutil.copyfile(src, folder / "tokenizer.json")
        beside = src.with_name("tokenizer_config.json")
        if beside.is_file():
            shutil.copyfile(beside, folder / "tokenizer_config.json")
        else:
            (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
        return
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"cannot save {type(tokenizer).__name__}: pass a Hugging Face tokenizer or a tokenizer.json "
                        "path")
    tokenizer.save_pretrained(str(folder))
