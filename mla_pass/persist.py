"""Save and load converted models: ``model.safetensors`` + ``mla_config.json`` (no pickle).

Loading rebuilds the source model's architecture (from its saved Hugging Face config, or from
a ``model=`` template you pass), re-runs capture and matching, creates each latent attention
module from its saved plan, and loads the weights strictly. The JSON holds a SHA-256 of the
weights file, so a truncated or edited checkpoint is refused instead of loading wrong numbers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import MLAConfig
from .latent_attention import SitePlan
from .model import CONFIG_FILE, MLAModel
from .runtime.manifest import sha256

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    pass


def save_model(mla: MLAModel, path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for name, t in mla.program.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]        # tied weights are stored once
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    weights = path / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "mla-pass", "version": str(FORMAT_VERSION)})
    os.replace(tmp, weights)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": mla.config.to_dict(),
        "plans": [mla.plans[i].to_dict() for i in sorted(mla.plans)],
        "source": mla.source,
        "takes_positions": mla.takes_positions,
        "vocab_size": mla.vocab_size,
        "generation": mla.generation,
        "aliases": aliases,
        "weights_sha256": sha256(weights),
        "kv_cache_bytes_per_token_fp16": mla.kv_cache_bytes_per_token(torch.float16),
        "original_kv_cache_bytes_per_token_fp16": mla.original_kv_cache_bytes_per_token(torch.float16),
    }
    _json_dump(meta, path / CONFIG_FILE)
    return path


def load(path: str | os.PathLike, model: torch.nn.Module | None = None) -> MLAModel:
    """Load a model written by ``MLAModel.save``.

    Args:
        path: the folder holding ``mla_config.json`` and ``model.safetensors``.
        model: for models that are not Hugging Face models, a freshly built instance of the
            source architecture (its weights are ignored). Hugging Face models are rebuilt from
            the saved config.

    Example:
        >>> mla.save("out/smollm2-mla"); mla2 = load("out/smollm2-mla")   # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .capture import capture
    from .pipeline import build

    path = Path(path)
    meta = _read_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; re-save the model with mla.save({str(path)!r})")
    digest = sha256(weights)
    if digest != meta["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the checksum in {CONFIG_FILE} (truncated or edited "
                              "after saving); re-save or re-convert the model")
    try:
        config = MLAConfig.from_dict(meta["config"])
        plans = {p["index"]: SitePlan(**p) for p in meta["plans"]}
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} has an invalid config or plan ({e}); re-save the model") from e
    if model is None:
        model = _rebuild_source(meta["source"])
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}); re-save the model") from e
    for alias, target in meta.get("aliases", {}).items():
        if target not in tensors:
            raise CheckpointError(f"{CONFIG_FILE} ties {alias} to {target}, which is not in {WEIGHTS_FILE}")
        tensors[alias] = tensors[target]
    with torch.device("cpu"):
        mla = build(capture(model), config, plans=plans, progress=False)
    expected = mla.program.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"{weights} does not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {bad_shape[:5]}; the checkpoint and the source architecture disagree")
    mla.program.load_state_dict(tensors, strict=True)
    mla.generation = meta.get("generation", mla.generation)
    return mla


def _read_meta(path: Path) -> dict:
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise CheckpointError(f"{cfg} is missing: {path} is not a folder written by MLAModel.save")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e}); re-save the model") from e
    need = {"format_version", "config", "plans", "source", "weights_sha256"}
    if not isinstance(meta, dict) or not need <= set(meta):
        raise CheckpointError(f"{cfg} lacks {sorted(need - set(meta or {}))}; re-save the model")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{cfg} has format version {meta['format_version']}, this mla-pass reads "
                              f"{FORMAT_VERSION}")
    return meta


def _rebuild_source(source: dict) -> torch.nn.Module:
    if source.get("kind") != "transformers":
        raise CheckpointError(f"the source model ({source.get('class')}) is not a Hugging Face model: pass a "
                              "freshly built instance as load(path, model=...)")
    try:
        import transformers
    except ImportError as e:
        raise CheckpointError("loading needs transformers to rebuild the source model: pip install transformers") from e
    cfg_dict = dict(source["config"])
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("the saved source config has no model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    cls = getattr(transformers, source.get("class", ""), None) or transformers.AutoModelForCausalLM
    with torch.device("cpu"):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    return model.eval()



def _json_dump(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
