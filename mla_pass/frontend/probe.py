"""Measure what a matched site computes by evaluating pieces of its graph on probe inputs.

- The k and v paths from the hidden state are affine: evaluating them in float64 on zero and
  on basis vectors recovers W and b exactly, whatever the projection looked like (separate
  Linear, GPT-2's Conv1D ``addmm``, GPT-NeoX's per-head interleaved ``query_key_value``,
  Phi-3's sliced ``qkv_proj``, a folded norm weight).
- The RoPE region is linear and acts on pairs of dims: probing it with basis vectors at
  position 0 (must be the identity) and position 1 gives which dims pair up (the layout) and
  each pair's angular speed (its frequency). Dims that never pair are not rotated (partial
  rotary, e.g. GPT-NeoX ``rotary_pct``).
Every extraction is verified against the recorded run; a mismatch is a refusal, not a guess.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import graph as G
from .match import AttentionSite, SiteError, layout_of


@dataclass
class SiteWeights:
    """Key/value projections in head layout: k = w_key·x + b_key, per kv head."""
    w_key: torch.Tensor           # [Hkv, Dh, D]
    b_key: torch.Tensor | None    # [Hkv, Dh]
    w_value: torch.Tensor         # [Hkv, Dv, D]
    b_value: torch.Tensor | None  # [Hkv, Dv]


@dataclass
class KeyNormWeights:
    """What computing the per-token key scale needs: s = rsqrt(mean_group((A·x + a)²) + eps)."""
    full_weight: torch.Tensor     # A [Hkv, Dh, D]
    full_bias: torch.Tensor | None
    eps: float
    group: str                    # "head" | "all"


@dataclass
class RopeLayout:
    """Which dims rotate together and how fast; pairs are (i, j) with i < j."""
    pairs: list[tuple[int, int]]
    speeds: list[float]           # radians per position, per pair
    unrotated: list[int]          # dims that never rotate
    layout: str                   # "half" | "interleaved" | "partial-half" | "partial-interleaved" | "none" | "other"

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for checking a probe against the recorded run in ``dtype``."""
    return {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-3}.get(dtype, 3e-2)


def extract_site_weights(gm: fx.GraphModule, site: AttentionSite, env: dict) -> None:
    """Fill ``site.weights``, ``site.rope`` and ``site.kv_head_of_query`` (or raise SiteError)."""
    x_val = env[site.hidden]
    batch, seq = env[site.core.query].shape[0], env[site.core.query].shape[2]
    dtype = x_val.dtype
    if site.key_norm is None:
        w_k, b_k = _affine_map(gm, site, env, site.key_raw, batch, seq)
    else:
        w_k, b_k = _normed_key(gm, site, env, batch, seq)
    w_v, b_v = _affine_map(gm, site, env, site.value_head, batch, seq)
    site.weights = SiteWeights(
        w_key=w_k.to(dtype), b_key=None if b_k is None else b_k.to(dtype),
        w_value=w_v.to(dtype), b_value=None if b_v is None else b_v.to(dtype))
    key_rope = _probe_rope(gm, site, env, "key", site.key_raw, site.key_head, site.key_rope_nodes)
    query_rope = _probe_rope(gm, site, env, "query", site.query_raw, site.core.query, site.query_rope_nodes)
    if key_rope.pairs != query_rope.pairs or not torch.allclose(
            torch.tensor(key_rope.speeds), torch.tensor(query_rope.speeds), rtol=1e-4, atol=1e-7):
        raise SiteError(site.layer, site.core.anchor.name, "q and k are rotated differently")
    site.rope = key_rope
    site.kv_head_of_query = _kv_head_map(site, env)


def to_heads(t: torch.Tensor, layout: str) -> torch.Tensor:
    """[B,H,S,D] from either BHSD or BSHD."""
    return t if layout == "BHSD" else t.transpose(1, 2)


def _affine_map(gm, site, env, target: fx.Node, batch: int, seq: int, heads_fn=None):
    """W [Hkv, Dout, D], b [Hkv, Dout] | None of the affine path hidden → target (BHSD or BSHD,
    or any layout ``heads_fn`` maps to BHSD)."""
    if heads_fn is None:
        layout = layout_of(env[target], batch, seq)
        heads_fn = lambda t: to_heads(t, layout)  # noqa: E731
    heads = heads_fn(env[target]).shape[1]
    x_shape = env[site.hidden].shape

    def to_tokens(t):                                      # [B, H, S, Dout] → [B, S, H·Dout]
        t = heads_fn(t)
        return t.transpose(1, 2).reshape(*t.shape[:1], t.shape[2], -1)

    w, b = affine_map(gm, env, site.hidden, target, to_source=lambda x: x.reshape(x_shape), to_tokens=to_tokens,
                      layer=site.layer)
    w = w.reshape(heads, -1, w.shape[-1])                  # [H, Dout, D]
    return w, (None if b is None else b.reshape(heads, -1))


def affine_map(gm: fx.GraphModule, env: dict, source: fx.Node, target: fx.Node, *, to_source, to_tokens,
               layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W [O, I], b [O] | None (float64) of a per-token affine path source → target, from probes.

    ``to_source`` maps a [B, S, I] token tensor to the source node's layout, ``to_tokens`` the
    target's value to [B, S, O]. The map is evaluated in float64 on zero and on basis vectors
    (B·S of them per run), then verified on the recorded run: a path that is not affine, or
    that mixes tokens, is a ``SiteError`` naming the target node."""
    nodes = G.region(source, target)
    rec_tokens = to_tokens(env[target])
    batch, seq = rec_tokens.shape[:2]
    wide = torch.float64

    def cast(v):
        return v.to(wide) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def run(tokens_BSI):
        try:
            out = G.run_region(gm, nodes, env, {source: to_source(tokens_BSI)}, cast=cast)[target]
        except Exception as e:  # an op that cannot run on a probe is not affine in our sense
            raise SiteError(layer, target.name, f"path from '{source.name}' could not be probed: {e}") from e
        return to_tokens(out)

    src = env[source]
    dev = src.device
    d = src.numel() // (batch * seq)
    tokens = batch * seq
    bias = run(torch.zeros(batch, seq, d, dtype=wide, device=dev))[0, 0]     # [O]
    cols = []
    eye = torch.eye(d, dtype=wide, device=dev)
    for start in range(0, d, tokens):
        chunk = eye[start:start + tokens]
        probe = torch.zeros(tokens, d, dtype=wide, device=dev)
        probe[: chunk.shape[0]] = chunk
        out = run(probe.reshape(batch, seq, d)).reshape(tokens, -1)[: chunk.shape[0]]
        cols.append(out - bias)
    w = torch.cat(cols).T.contiguous()                                         # [O, I]
    # verify on the recorded run (relative tolerance of the recorded dtype)
    x_rec = _source_tokens(src, to_source, batch, seq, d)
    recomputed = x_rec.to(wide) @ w.T + bias
    reference = rec_tokens.to(wide)
    err = (recomputed - reference).abs().max().item()
    tol = _tolerance(src.dtype) * max(1.0, reference.abs().max().item())
    if err > tol:
        raise SiteError(layer, target.name, f"path from '{source.name}' is not affine "
                        f"(reconstruction error {err:.2e}); q/k normalisation is not supported yet")
    has_bias = bias.abs().max().item() > 0
    return w, (bias if has_bias else None)


def _source_tokens(value: torch.Tensor, to_source, batch: int, seq: int, d: int) -> torch.Tensor:
    """The recorded source value as [B, S, I] tokens: ``to_source`` is a pure layout map, so its
    inverse is read off by sending the token indices through it."""
    index = torch.arange(batch * seq * d, dtype=torch.float64).reshape(batch, seq, d)
    where = to_source(index).reshape(-1).long()                 # source position → token position
    flat = torch.empty(batch * seq * d, dtype=value.dtype, device=value.device)
    flat[where.to(value.device)] = value.reshape(-1)
    return flat.reshape(batch, seq, d)


def _normed_key(gm, site, env, batch, seq):
    """k = w ⊙ t·rsqrt(mean(t²)+eps), t = A·x + a: returns w⊙A, w⊙a and records A, a, eps."""
    norm = site.key_norm
    n_kv, dh = site.n_kv_heads, site.head_dim

    def heads(t):
        if norm.group == "all":
            t = t.reshape(*t.shape[:2], n_kv, dh)
            return t.transpose(1, 2)
        return to_heads(t, layout_of(t, batch, seq))

    a_w, a_b = _affine_map(gm, site, env, norm.norm_in, batch, seq, heads_fn=heads)
    ones = torch.ones_like(env[norm.norm_in])
    f_ones = G.run_region(gm, G.region(norm.norm_in, norm.norm_out), env, {norm.norm_in: ones})[norm.norm_out]
    weight = (heads(f_ones)[0, :, 0, :].double() * (1.0 + norm.eps) ** 0.5)          # [Hkv, Dh]
    # verify the whole normalised key on the recorded run
    x = env[site.hidden].double()
    t = torch.einsum("hod,bsd->bhso", a_w, x) + (0 if a_b is None else a_b[None, :, None, :])
    ms = t.pow(2).mean(-1, keepdim=True) if norm.group == "head" else t.pow(2).mean((1, 3), keepdim=True)
    recon = weight[None, :, None, :] * t * torch.rsqrt(ms + norm.eps)
    ref = to_heads(env[site.key_raw], site.raw_layouts["key"]).double()
    err = (recon - ref).abs().max().item()
    if err > _tolerance(env[site.hidden].dtype) * max(1.0, ref.abs().max().item()):
        raise SiteError(site.layer, norm.norm_out.name, f"key normalisation is not w·t·rsqrt(mean(t²)+eps) "
                        f"(reconstruction error {err:.2e})")
    dtype = env[site.hidden].dtype
    site.key_norm_weights = KeyNormWeights(full_weight=a_w.to(dtype), full_bias=None if a_b is None else a_b.to(dtype),
                                           eps=norm.eps, group=norm.group)
    w_k = weight[:, :, None] * a_w
    b_k = None if a_b is None else weight * a_b
    return w_k, b_k


def _probe_rope(gm, site, env, kind: str, raw: fx.Node, head: fx.Node, nodes: list[fx.Node]) -> RopeLayout:
    dim = env[head].shape[-1]
    if not nodes:
        return RopeLayout(pairs=[], speeds=[], unrotated=list(range(dim)), layout="none")
    raw_layout = site.raw_layouts[kind]
    shape = env[raw].shape

    def run(probe_bhsd):
        probe = to_heads(probe_bhsd, raw_layout)  # BHSD → raw layout (transpose is its own inverse)
        try:
            return G.run_region(gm, nodes, env, {raw: probe.contiguous()})[head]   # BHSD
        except Exception as e:
            raise SiteError(site.layer, head.name, f"RoPE region could not be probed: {e}") from e

    heads_shape = to_heads(torch.empty(shape, device="meta"), raw_layout).shape
    dtype, dev = env[raw].dtype, env[raw].device
    where = f"RoPE region ending at '{head.name}'"
    if heads_shape[2] < 2:
        raise SiteError(site.layer, head.name, f"{where} cannot be probed on fewer than two tokens")
    responses = torch.zeros(heads_shape[0], 2, dim, dim, dtype=torch.float64)   # [batch, token, out, in], head 0
    for i in range(dim):
        probe = torch.zeros(heads_shape, dtype=dtype, device=dev)
        probe[..., i] = 1
        out = run(probe)
        responses[..., i] = out[:, 0, :2, :].double().cpu()
    # a batch row whose first two tokens sit at positions 0 and 1: the recorded run may hold
    # left-padded rows (their first tokens sit at some other position, or all at position 0)
    eye = torch.eye(dim, dtype=torch.float64)
    at_zero = [b for b in range(responses.shape[0]) if torch.allclose(responses[b, 0], eye, atol=1e-6)]
    moving = [b for b in at_zero if not torch.allclose(responses[b, 1], eye, atol=1e-6)]
    row = (moving or at_zero or [None])[0]
    if row is None:
        raise SiteError(site.layer, head.name, f"{where} is not the identity at position 0 "
                        "(a scale or mix after RoPE is not supported)")
    response = responses[row]
    # linearity and uniformity across heads, checked on a random probe at position 1
    rnd = torch.randn(heads_shape, generator=torch.Generator().manual_seed(0)).to(dtype=dtype, device=dev)
    got = run(rnd)[row, :, 1, :].double()
    want = torch.einsum("oi,hi->ho", response[1].to(dev), rnd[row, :, 1, :].double())
    tol = _tolerance(dtype) * max(1.0, want.abs().max().item())
    if not torch.allclose(got, want, atol=tol, rtol=tol):
        raise SiteError(site.layer, head.name, f"{where} is not a per-dim-pair rotation")
    m1 = response[1]
    linked = (m1 != 0) | (m1.T != 0)
    linked.fill_diagonal_(False)
    pairs, speeds, unrotated = [], [], []
    for i in range(dim):
        partners = linked[i].nonzero().flatten().tolist()
        if not partners:
            unrotated.append(i)
        elif len(partners) > 1:
            raise SiteError(site.layer, head.name, f"{where} mixes dim {i} with {partners}")
        elif i < partners[0]:
            j = partners[0]
            pairs.append((i, j))
            speeds.append(math.atan2(abs(m1[j, i].item()), m1[i, i].item()))
    return RopeLayout(pairs=pairs, speeds=speeds, unrotated=unrotated, layout=_name_layout(pairs, unrotated, dim))


def _name_layout(pairs, unrotated, dim) -> str:
    rotated = 2 * len(pairs)
    partial = "partial-" if unrotated else ""
    if pairs and all(j - i == rotated // 2 for i, j in pairs) and max(j for _, j in pairs) == rotated - 1:
        return partial + "half"
    if pairs and all(j == i + 1 and i % 2 == 0 for i, j in pairs):
        return partial + "interleaved"
    return "other"


def _kv_head_map(site: AttentionSite, env) -> tuple[int, ...]:
    """Which kv head each query head reads, read off the recorded key as fed to the core."""
    fed, kv = env[site.core.key], env[site.key_head]
    if site.core.enable_gqa or fed.shape[1] == kv.shape[1]:
        g = site.n_heads // site.n_kv_heads
        return tuple(h // g for h in range(site.n_heads))
    mapping = []
    for h in range(site.n_heads):
        match = [j for j in range(site.n_kv_heads) if torch.equal(fed[:, h], kv[:, j])]
        if not match:
            raise SiteError(site.layer, site.core.key.name, f"query head {h} reads no single kv head")
        mapping.append(match[0])
    return tuple(mapping)
