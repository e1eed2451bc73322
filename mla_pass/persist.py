"""The checkpoint format of converted models: ``model.safetensors`` + ``mla_config.json`` (no pickle).

``save_model`` writes one; ``read_checkpoint`` reads it back verified: the JSON holds a SHA-256
of the weights file, so a truncated or edited checkpoint is refused instead of loading wrong
numbers. Rebuilding the model from it (capture the source architecture again, create each latent
attention module from its saved plan, load the weights strictly) is ``pipeline.load``; the
compile backend reads the same checkpoint (``options={"checkpoint": DIR}``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import MLAConfig
from .modules.site_plan import RetiredLayoutError, SitePlan
from .runtime.manifest import sha256

FORMAT_VERSION = 1
CONFIG_FILE = "mla_config.json"     # marks a folder written by MLAModel.save
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    """A verified checkpoint: what ``MLAModel.save`` wrote."""
    path: Path
    config: MLAConfig
    plans: dict[int, SitePlan]
    tensors: dict[str, torch.Tensor]        # the program's state dict (tied weights restored)
    meta: dict                              # everything else in mla_config.json (source, generation, ...)


def check_save_folder(path: str | os.PathLike, own: tuple[str, ...] = ()) -> None:
    """``path`` can take a save: a new or empty folder, or one holding an earlier save (which the
    new one replaces), or, for a command that keeps its own files there (``own``: ``mla-pass
    recover``'s checkpoint), one holding those. Never a file, a source model's folder (its
    ``model.safetensors`` would be replaced by the converted one) or a folder of other files (they
    would be mixed with the save)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file: save into a folder (a new or empty one)")
    if (path / "config.json").is_file() and not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} holds a Hugging Face model (config.json), not an mla-pass save: saving there "
                              f"would overwrite its weights; choose another folder")
    if path.is_dir() and any(path.iterdir()) and not any((path / name).is_file() for name in (CONFIG_FILE, *own)):
        sample = sorted(p.name for p in path.iterdir())[:3]
        raise CheckpointError(f"{path} holds other files ({sample}), not an mla-pass save: the save would be mixed "
                              "with them; choose a new or empty folder")


def save_model(mla, path: Path, own: tuple[str, ...] = ()) -> Path:
    """Write ``mla`` (an ``MLAModel``) into the folder ``path`` (``check_save_folder``; over an
    earlier save the folder holds the old checkpoint or the new one at every moment, ``write_pair``)."""
    check_save_folder(path, own)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for name, t in mla.program.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]        # tied weights are stored once
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    meta = {
        "format_version": FORMAT_VERSION,
        "config": mla.config.to_dict(),
        "plans": [mla.plans[i].to_dict() for i in sorted(mla.plans)],
        "source": mla.source,
        "takes_positions": mla.takes_positions,
        "vocab_size": mla.vocab_size,
        "generation": mla.generation,
        "aliases": aliases,
        "kv_cache_bytes_per_token_fp16": mla.kv_cache_bytes_per_token(torch.float16),
        "original_kv_cache_bytes_per_token_fp16": mla.original_kv_cache_bytes_per_token(torch.float16),
    }
    write_pair(path / WEIGHTS_FILE, tensors, path / CONFIG_FILE, meta,
               metadata={"format": "mla-pass", "version": str(FORMAT_VERSION)})
    return path


def write_pair(weights: Path, tensors: dict, described_by: Path, meta: dict, metadata: dict | None = None) -> str:
    """Write a safetensors file and the JSON that describes it as one checkpoint, over an older
    pair or not: both are written whole beside their names first, the JSON (holding the weights'
    SHA-256 as ``weights_sha256``) last, then renamed into place. The pending JSON is a journal:
    ``finish_pair`` (run by every reader) completes the renames if the writer died between them,
    or removes the pending files if it died before. Returns the weights' SHA-256."""
    from safetensors.torch import save_file

    finish_pair(weights, described_by)
    save_file(tensors, str(_pending(weights)), metadata=metadata)
    _fsync(_pending(weights))
    digest = sha256(_pending(weights))
    _pending(described_by).write_text(json.dumps({**meta, "weights_sha256": digest}, indent=2, sort_keys=True))
    _fsync(_pending(described_by))
    os.replace(_pending(weights), weights)         # from here the new checkpoint is the one on disk
    os.replace(_pending(described_by), described_by)
    return digest


def _pending(path: Path) -> Path:
    return path.with_name(path.name + ".pending")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def finish_pair(weights: Path, described_by: Path) -> None:
    """Complete or undo a ``write_pair`` that died midway, so that one whole pair is left: the new
    one if its weights were already in place (the pending JSON names their checksum), else the old
    one (the pending files are removed)."""
    pending = _pending(described_by)
    if pending.is_file():
        try:
            want = json.loads(pending.read_text())["weights_sha256"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            want = None                            # died while writing it
        if want and not _pending(weights).exists() and weights.is_file() and sha256(weights) == want:
            os.replace(pending, described_by)      # died between the two renames: finish the write
        else:
            pending.unlink()
    _pending(weights).unlink(missing_ok=True)


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: give the folder written by MLAModel.save")
    finish_pair(path / WEIGHTS_FILE, path / CONFIG_FILE)
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


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a folder written by ``MLAModel.save``; every problem is a ``CheckpointError``
    that says what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = _read_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; re-save the model with mla.save({str(path)!r})")
    if sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the checksum in {CONFIG_FILE} (truncated or edited "
                              "after saving); re-save or re-convert the model")
    try:
        config = MLAConfig.from_dict(meta["config"])
        plans = {p["index"]: SitePlan.from_dict(p) for p in meta["plans"]}
    except RetiredLayoutError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} has an invalid config or plan ({e}); re-save the model") from e
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}); re-save the model") from e
    for alias, target in meta.get("aliases", {}).items():
        if target not in tensors:
            raise CheckpointError(f"{CONFIG_FILE} ties {alias} to {target}, which is not in {WEIGHTS_FILE}")
        tensors[alias] = tensors[target]
    return Checkpoint(path, config, plans, tensors, meta)


def rebuild_source(source: dict) -> torch.nn.Module:
    """The source architecture (random weights) from a checkpoint's ``source`` record."""
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
