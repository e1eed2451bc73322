"""The contract between an exported folder and the runtime: one JSON file, no torch.

An exported folder holds ``manifest.json`` (this), the ONNX model (``model.onnx`` plus
``model.onnx.data`` for the weights), and ``tokenizer.json``. The ONNX program is one decode
step over an explicit cache::

    inputs : input_ids [B,S] int64, attention_mask [B,T+S] int64 (1 = real token, left padding),
             position_ids [B,S] int64, then per cache entry its ``input`` name with ``shape``
    outputs: logits [B,S,V], then per cache entry its ``output`` name holding T+S tokens

Cache shapes are lists whose symbolic entries are ``"batch"`` and ``"past"`` (``"past"`` sits at
``time_axis``); every other entry is a fixed size. The MLA export has per attention site
``past_key_values.{i}.latent [B,T,C]`` and ``past_key_values.{i}.rope_key [B,1,T,2S]`` (S rope
slots shared by every head); the export of an unconverted model has ``past_key_values.{i}.key|value [B,Hkv,T,D]``: the runtime
treats both alike. With ``cache_update="in_place"`` the past inputs are instead preallocated
buffers (any length ≥ T+S) that the program updates at index T and returns as present (see the
field). ``files`` holds the SHA-256 of every other file in the folder, so a corrupted
or swapped file is refused before a session is built.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_FILE = "manifest.json"
FORMAT = "mla-pass-onnx"
VERSION = 1
DTYPES = ("float32", "float16", "int8", "uint8")
CACHE_UPDATES = ("concat", "in_place")


class ManifestError(ValueError):
    """An exported folder that cannot be used as it is; the message says what to do."""


@dataclass
class CacheEntry:
    input: str                     # "past_key_values.{i}.latent"
    output: str                    # "present.{i}.latent"
    shape: list                    # e.g. ["batch", "past", 96]
    dtype: str = "float32"
    time_axis: int = 1

    def concrete_shape(self, batch: int, past: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else past if d == "past" else int(d) for d in self.shape)

    def values_per_token(self) -> int:
        n = 1
        for d in self.shape:
            if d not in ("batch", "past"):
                n *= int(d)
        return n


@dataclass
class Manifest:
    kind: str                                  # "mla" | "original"
    dtype: str                                 # weights/activations: "float32" | "float16"
    vocab_size: int
    max_length: int                            # positions the model supports (prompt + new tokens)
    cache: list[CacheEntry]
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    model_file: str = "model.onnx"
    tokenizer_file: str | None = "tokenizer.json"
    mla_config: dict | None = None
    source: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # how it was exported (attention formulation, quantization)
    files: dict[str, str] = field(default_factory=dict)
    # "concat": present = concat(past, new) holds T+S tokens (a new tensor each step).
    # "in_place": each past input is a preallocated buffer of any length ≥ T+S; the program writes
    # the S new tokens at index T (T = attention_mask length − S, e.g. with TensorScatter) and
    # returns the same buffer as present, which the runtime binds to the same memory (no copy).
    cache_update: str = "concat"
    format: str = FORMAT
    version: int = VERSION

    # -- sizes -----------------------------------------------------------------------------------
    def kv_cache_bytes_per_token(self) -> int:
        size = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1}
        return sum(e.values_per_token() * size[e.dtype] for e in self.cache)

    # -- files ----------------------------------------------------------------------------------
    def write(self, folder: str | Path) -> Path:
        """Hash every file in ``folder`` (except the manifest) and write the manifest beside them."""
        folder = Path(folder)
        self.files = {p.name: sha256(p) for p in sorted(folder.iterdir())
                      if p.is_file() and p.name != MANIFEST_FILE}
        path = folder / MANIFEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path, verify: bool = True) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{folder} has no {MANIFEST_FILE}: it is not a folder written by "
                                "mla_pass.export.to_onnx (export the model again)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON ({e}): export the model again") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ManifestError(f"{path} is not an mla-pass ONNX manifest (format {raw.get('format')!r})")
        if raw.get("version") != VERSION:
            raise ManifestError(f"{path} has manifest version {raw.get('version')}, this runtime reads "
                                f"version {VERSION}: export again with this mla-pass version")
        try:
            raw["cache"] = [CacheEntry(**e) for e in raw["cache"]]
            manifest = cls(**raw)
        except (TypeError, KeyError) as e:
            raise ManifestError(f"{path} is missing or has unexpected fields ({e}): export the model again") from e
        manifest.validate()
        if verify:
            manifest.verify_files(folder)
        return manifest

    def validate(self) -> None:
        if self.kind not in ("mla", "original"):
            raise ManifestError(f"manifest kind must be 'mla' or 'original', got {self.kind!r}")
        if self.dtype not in ("float32", "float16"):
            raise ManifestError(f"manifest dtype must be float32 or float16, got {self.dtype!r}")
        if self.cache_update not in CACHE_UPDATES:
            raise ManifestError(f"manifest cache_update must be one of {CACHE_UPDATES}, got {self.cache_update!r}")
        for e in self.cache:
            if e.dtype not in DTYPES:
                raise ManifestError(f"cache entry {e.input} has unknown dtype {e.dtype!r}")
            if e.shape.count("past") != 1 or e.shape[e.time_axis] != "past" or e.shape[0] != "batch":
                raise ManifestError(f"cache entry {e.input} has shape {e.shape}: expected 'batch' first and "
                                    f"'past' at time_axis {e.time_axis}")

    def verify_files(self, folder: Path) -> None:
        for name in [self.model_file] + ([self.tokenizer_file] if self.tokenizer_file else []):
            if not (folder / name).is_file():
                raise ManifestError(f"{folder / name} is missing: copy the whole exported folder, or export again")
        for name, digest in self.files.items():
            path = folder / name
            if not path.is_file():
                raise ManifestError(f"{path} is listed in the manifest but missing: copy the whole exported folder")
            if sha256(path) != digest:
                raise ManifestError(f"{path} does not match its SHA-256 in {MANIFEST_FILE} (corrupted or "
                                    "replaced): export the model again")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
