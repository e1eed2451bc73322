"""Small real ONNX decoders that honour the runtime's contract, and a numpy reference for them.

Built with ``onnx.helper`` (no torch) so the runtime can be tested before and independently of
the exporter. One step of the program (B batch, S new tokens, T cached tokens, K = T + S keys)::

    x_BSD = E[input_ids] + P[position_ids]
    per layer, kind "mla":
        latent_BKC   = cache(past latent [B,T,C],    x_BSD @ Wc)             # → present.{i}.latent
        rope_BHKR    = cache(past rope_key [B,H,T,R], heads(x_BSD @ Wkr))    # → present.{i}.rope_key
        scores_BHSK  = heads(x @ Wql) · latent + heads(x @ Wqr) · rope_key, scaled, masked
        x_BSD       += (softmax(scores) @ latent) @ Wo ;  x += tanh(x @ W1) @ W2
    per layer, kind "original": key/value [B,H,T,Dh] caches and ordinary attention
    logits_BSV = x_BSD @ Wlm

``cache`` is ``Concat`` on the time axis (``cache_update="concat"``: present holds T+S tokens)
or ``TensorScatter`` (opset 24) at index T (``"in_place"``: past and present are the same
preallocated buffer). The mask allows key j for query i when attention_mask[b, j] = 1 and
j ≤ T + i, so keys past T + S in an in-place buffer are never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mla_pass.runtime.manifest import CacheEntry, Manifest

EOS = "<|eos|>"
CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "a quick brown fox jumps over the lazy dog near the river bank",
    "café naïve jalapeño über straße 東京 ☕ données élève",
    "one two three four five six seven eight nine ten",
    "hello world, hello runtime; the cache grows one token at a time",
]


@dataclass
class ToySpec:
    kind: str = "mla"                 # "mla" (latent + rope_key caches) | "original" (key/value)
    vocab: int = 300
    hidden: int = 32
    layers: int = 2
    heads: int = 2                    # kv heads = query heads
    latent: int = 16                  # C, mla only
    rope: int = 4                     # R, mla only
    head_dim: int = 8                 # Dh, original only
    max_length: int = 64
    cache_update: str = "concat"      # "concat" | "in_place"
    attend: bool = True               # False: layers only write their cache (benchmarks of cache handling)
    seed: int = 0

    def cache_entries(self) -> list[CacheEntry]:
        out = []
        for i in range(self.layers):
            if self.kind == "mla":
                out += [CacheEntry(f"past_key_values.{i}.latent", f"present.{i}.latent", ["batch", "past", self.latent], "float32", 1),
                        CacheEntry(f"past_key_values.{i}.rope_key", f"present.{i}.rope_key", ["batch", self.heads, "past", self.rope], "float32", 2)]
            else:
                out += [CacheEntry(f"past_key_values.{i}.{n}", f"present.{i}.{n}", ["batch", self.heads, "past", self.head_dim], "float32", 2)
                        for n in ("key", "value")]
        return out


def toy_weights(spec: ToySpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    d, h = spec.hidden, spec.heads

    def w(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[0])).astype(np.float32)

    out = {"E": rng.standard_normal((spec.vocab, d)).astype(np.float32),
           "P": (0.5 * rng.standard_normal((spec.max_length, d))).astype(np.float32),
           "Wlm": w(d, spec.vocab, scale=3.0)}
    for i in range(spec.layers):
        if spec.kind == "mla":
            out.update({f"{i}.Wc": w(d, spec.latent), f"{i}.Wkr": w(d, h * spec.rope), f"{i}.Wql": w(d, h * spec.latent),
                        f"{i}.Wqr": w(d, h * spec.rope), f"{i}.Wo": w(h * spec.latent, d)})
        else:
            out.update({f"{i}.{n}": w(d, h * spec.head_dim) for n in ("Wq", "Wk", "Wv")})
            out[f"{i}.Wo"] = w(h * spec.head_dim, d)
        out.update({f"{i}.W1": w(d, 2 * d), f"{i}.W2": w(2 * d, d)})
    return out


class _Graph:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, value, dtype=np.int64) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self.n += 1
        out = out or f"{op.lower()}{self.n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def heads(self, x: str, w: str, h: int, size: int) -> str:
        """[B,S,D] @ W → [B,H,S,size]"""
        y = self.op("Reshape", self.op("MatMul", x, w), self.const([0, 0, h, size]))
        return self.op("Transpose", y, perm=[0, 2, 1, 3])


def build_model(spec: ToySpec) -> onnx.ModelProto:
    g, wts = _Graph(), toy_weights(spec)
    for name, value in wts.items():
        g.weight(name, value)
    entries = spec.cache_entries()
    x = g.op("Add", g.op("Gather", "E", "input_ids"), g.op("Gather", "P", "position_ids"))

    seq_1 = g.op("Shape", "input_ids", start=1, end=2)
    total_1 = g.op("Shape", "attention_mask", start=1, end=2)
    past_1 = g.op("Sub", total_1, seq_1)
    zero, one = g.const(0), g.const(1)
    in_place = spec.cache_update == "in_place"
    # keys: T+S with a concatenated cache; the whole preallocated buffer when updated in place
    keys_1 = g.op("Shape", entries[0].input, start=entries[0].time_axis, end=entries[0].time_axis + 1) if in_place else total_1
    kpos_K = g.op("Range", zero, g.op("Squeeze", keys_1), one)
    qpos_S = g.op("Range", g.op("Squeeze", past_1), g.op("Squeeze", total_1), one)
    causal_SK = g.op("LessOrEqual", g.op("Unsqueeze", kpos_K, g.const([0])), g.op("Unsqueeze", qpos_S, g.const([1])))
    mask_BK = "attention_mask"
    if in_place:
        pads = g.op("Concat", g.const([0, 0, 0]), g.op("Sub", keys_1, total_1), axis=0)
        mask_BK = g.op("Pad", mask_BK, pads)
    pad_B11K = g.op("Unsqueeze", g.op("Cast", mask_BK, to=TensorProto.BOOL), g.const([1, 2]))
    allowed_B1SK = g.op("And", causal_SK, pad_B11K)
    write_B = g.op("Expand", past_1, g.op("Shape", "input_ids", start=0, end=1)) if in_place else None
    neg = g.const(-1e9, np.float32)

    def cache(entry: CacheEntry, new: str) -> str:
        if in_place:
            return g.op("TensorScatter", entry.input, new, write_B, out=entry.output, axis=entry.time_axis)
        return g.op("Concat", entry.input, new, out=entry.output, axis=entry.time_axis)

    def attend(scores_BHSK: str, values_BhKX: str, width: int) -> str:
        p = g.op("Softmax", g.op("Where", allowed_B1SK, scores_BHSK, neg), axis=-1)
        o = g.op("Transpose", g.op("MatMul", p, values_BhKX), perm=[0, 2, 1, 3])
        return g.op("Reshape", o, g.const([0, 0, width]))

    h = spec.heads
    for i in range(spec.layers):
        if spec.kind == "mla":
            latent_BKC = cache(entries[2 * i], g.op("MatMul", x, f"{i}.Wc"))
            rope_BHKR = cache(entries[2 * i + 1], g.heads(x, f"{i}.Wkr", h, spec.rope))
        else:
            key_BHKD = cache(entries[2 * i], g.heads(x, f"{i}.Wk", h, spec.head_dim))
            value_BHKD = cache(entries[2 * i + 1], g.heads(x, f"{i}.Wv", h, spec.head_dim))
        if spec.attend and spec.kind == "mla":
            lat_B1KC = g.op("Unsqueeze", latent_BKC, g.const([1]))
            s_lat = g.op("MatMul", g.heads(x, f"{i}.Wql", h, spec.latent), g.op("Transpose", lat_B1KC, perm=[0, 1, 3, 2]))
            s_rope = g.op("MatMul", g.heads(x, f"{i}.Wqr", h, spec.rope), g.op("Transpose", rope_BHKR, perm=[0, 1, 3, 2]))
            scale = g.const(1.0 / np.sqrt(spec.latent + spec.rope), np.float32)
            o = attend(g.op("Mul", g.op("Add", s_lat, s_rope), scale), lat_B1KC, h * spec.latent)
            x = g.op("Add", x, g.op("MatMul", o, f"{i}.Wo"))
        elif spec.attend:
            s = g.op("MatMul", g.heads(x, f"{i}.Wq", h, spec.head_dim), g.op("Transpose", key_BHKD, perm=[0, 1, 3, 2]))
            o = attend(g.op("Mul", s, g.const(1.0 / np.sqrt(spec.head_dim), np.float32)), value_BHKD, h * spec.head_dim)
            x = g.op("Add", x, g.op("MatMul", o, f"{i}.Wo"))
        x = g.op("Add", x, g.op("MatMul", g.op("Tanh", g.op("MatMul", x, f"{i}.W1")), f"{i}.W2"))
    g.op("MatMul", x, "Wlm", out="logits")

    def io(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    inputs = [io("input_ids", TensorProto.INT64, ["batch", "seq"]),
              io("attention_mask", TensorProto.INT64, ["batch", "total"]),
              io("position_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [io("logits", TensorProto.FLOAT, ["batch", "seq", spec.vocab])]
    for e in entries:
        inputs.append(io(e.input, TensorProto.FLOAT, e.shape))
        outputs.append(io(e.output, TensorProto.FLOAT, [("total" if d == "past" and not in_place else d) for d in e.shape]))
    graph = helper.make_graph(g.nodes, "toy_decoder", inputs, outputs, g.inits)
    opset = 24 if in_place else 18
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def train_tokenizer(vocab: int = 300):
    """A byte-level BPE tokenizer (like SmolLM2's) trained on a few lines with non-ASCII text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_folder(folder: str | Path, spec: ToySpec, tokenizer=None, eos_token_ids=None) -> Manifest:
    """Write model.onnx (+ model.onnx.data), tokenizer.json and manifest.json into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(spec), str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")
    eos = []
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
        eos = [tokenizer.token_to_id(EOS)]
    manifest = Manifest(kind=spec.kind, dtype="float32", vocab_size=spec.vocab, max_length=spec.max_length,
                        cache=spec.cache_entries(), eos_token_ids=eos if eos_token_ids is None else list(eos_token_ids),
                        tokenizer_file="tokenizer.json" if tokenizer is not None else None,
                        source={"toy": True, "seed": spec.seed}, cache_update=spec.cache_update)
    manifest.write(folder)
    return manifest


# -- the numpy reference: the same function, whole sequence, no cache -------------------------------
def reference_logits(spec: ToySpec, ids: list[int]) -> np.ndarray:
    """logits [S, V] of one unpadded sequence, recomputed from scratch in float64."""
    w = {k: v.astype(np.float64) for k, v in toy_weights(spec).items()}
    s, h = len(ids), spec.heads
    x = w["E"][ids] + w["P"][np.arange(s)]
    causal = np.tril(np.ones((s, s), dtype=bool))

    def heads(y, size):                     # [S, H*size] → [H, S, size]
        return y.reshape(s, h, size).transpose(1, 0, 2)

    def attend(scores_HSS, values_hSX):
        scores_HSS = np.where(causal, scores_HSS, -np.inf)
        p = np.exp(scores_HSS - scores_HSS.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return (p @ values_hSX).transpose(1, 0, 2).reshape(s, -1)

    for i in range(spec.layers):
        if spec.kind == "mla":
            lat = x @ w[f"{i}.Wc"]
            rope = heads(x @ w[f"{i}.Wkr"], spec.rope)
            scores = heads(x @ w[f"{i}.Wql"], spec.latent) @ lat.T + heads(x @ w[f"{i}.Wqr"], spec.rope) @ rope.transpose(0, 2, 1)
            o = attend(scores / np.sqrt(spec.latent + spec.rope), lat[None])
        else:
            q, k, v = (heads(x @ w[f"{i}.{n}"], spec.head_dim) for n in ("Wq", "Wk", "Wv"))
            o = attend(q @ k.transpose(0, 2, 1) / np.sqrt(spec.head_dim), v)
        x = x + o @ w[f"{i}.Wo"]
        x = x + np.tanh(x @ w[f"{i}.W1"]) @ w[f"{i}.W2"]
    return x @ w["Wlm"]


def reference_greedy(spec: ToySpec, ids: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """Greedy tokens by full recomputation every step (no cache), stopping after a stop id."""
    seq, out = list(ids), []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(reference_logits(spec, seq)[-1]))
        out.append(nxt)
        seq.append(nxt)
        if nxt in stop_ids:
            break
    return out
