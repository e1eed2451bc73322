"""A small, self-contained, generic decoder used by the tests (not a Hugging Face model).

``TinyDecoder(TinyConfig(...))`` covers the attention idioms the pass has to recognise by
dataflow alone: separate or fused q/k/v projections (with or without bias), RoPE in the
"half" (Llama ``rotate_half``), "interleaved" (GPT-J pairs ``(2k, 2k+1)``) and partial
layouts or no RoPE at all, GQA through ``repeat_kv`` or SDPA's ``enable_gqa``, and eager
attention (explicit matmul → scale → [softcap] → additive causal mask → softmax → matmul).

``forward(input_ids, position_ids=None) -> logits [B, S, vocab]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROPE_LAYOUTS = ("half", "interleaved", "partial-half", "partial-interleaved", "none")
ATTENTIONS = ("sdpa", "eager", "sdpa_gqa")


@dataclass
class TinyConfig:
    vocab: int = 64
    hidden: int = 48
    layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 12
    rope: str = "half"                # "half" | "interleaved" | "partial-half" | "partial-interleaved" | "none"
    rotary_dim: int | None = None     # dims rotated per head for the partial layouts (default head_dim // 2, even)
    qkv_bias: bool = False
    fused_qkv: bool = False
    attention: str = "sdpa"           # "sdpa" | "eager" | "sdpa_gqa"
    scale: float | None = None        # None: 1 / sqrt(head_dim)
    softcap: float | None = None      # eager only: tanh(s / cap) * cap before the mask
    rope_theta: float = 10000.0
    intermediate: int | None = None   # MLP width (default 2 * hidden)
    seed: int = 0
    init_std: float = 0.05

    def __post_init__(self):
        if self.rope not in ROPE_LAYOUTS:
            raise ValueError(f"rope must be one of {ROPE_LAYOUTS}, got {self.rope!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.softcap is not None and self.attention != "eager":
            raise ValueError("softcap needs attention='eager'")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even")

    @property
    def rotated_dims(self) -> int:
        """How many dims of each head RoPE rotates (0 without RoPE)."""
        if self.rope == "none":
            return 0
        if self.rope.startswith("partial-"):
            r = self.rotary_dim if self.rotary_dim is not None else self.head_dim // 2
            r = r // 2 * 2
            if not 0 < r < self.head_dim:
                raise ValueError(f"rotary_dim must be in (0, head_dim) for a partial layout, got {r}")
            return r
        return self.head_dim

    @property
    def rotary_pairs(self) -> int:
        return self.rotated_dims // 2

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """cos/sin tables from position_ids, and their application to q/k in [B, H, S, Dh]."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.layout = cfg.rope
        self.dims = cfg.rotated_dims
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.dims, 2, dtype=torch.float32) / max(self.dims, 1)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq           # [B, S, r]
        if self.layout.endswith("half"):
            emb = torch.cat((freqs, freqs), dim=-1)                        # [B, S, 2r]
        else:
            emb = freqs                                                    # [B, S, r] (pairs)
        return emb.cos()[:, None], emb.sin()[:, None]                      # [B, 1, S, *]

    def _rotate(self, x, cos, sin):
        if self.layout.endswith("half"):
            return x * cos + rotate_half(x) * sin
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def forward(self, q, k, cos, sin):
        if self.layout.startswith("partial-"):
            q_rot, q_pass = q[..., : self.dims], q[..., self.dims:]
            k_rot, k_pass = k[..., : self.dims], k[..., self.dims:]
            q = torch.cat((self._rotate(q_rot, cos, sin), q_pass), dim=-1)
            k = torch.cat((self._rotate(k_rot, cos, sin), k_pass), dim=-1)
            return q, k
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


def repeat_kv(x, n_rep: int):
    """[B, Hkv, S, Dh] → [B, Hkv * n_rep, S, Dh] (as in HF Llama)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = h * dh, hkv * dh
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.hidden, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden, self.q_size, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.hidden, self.kv_size, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.hidden, self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * dh, cfg.hidden, bias=False)
        self.scale = cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(dh)

    def forward(self, x, cos, sin, rotary: Rotary | None):
        cfg = self.cfg
        b, s, _ = x.shape
        if cfg.fused_qkv:
            q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, s, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, s, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, s, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = rotary(q, k, cos, sin)
        if cfg.attention == "sdpa_gqa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                 enable_gqa=cfg.n_heads != cfg.n_kv_heads)
        else:
            k = repeat_kv(k, cfg.group)
            v = repeat_kv(v, cfg.group)
            if cfg.attention == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            else:
                scores = q @ k.transpose(-1, -2) * self.scale
                if cfg.softcap is not None:
                    scores = torch.tanh(scores / cfg.softcap) * cfg.softcap
                keep = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
                mask = torch.zeros(s, s, dtype=scores.dtype, device=x.device).masked_fill(
                    ~keep, torch.finfo(scores.dtype).min)
                scores = scores + mask
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                out = probs @ v
        out = out.transpose(1, 2).reshape(b, s, cfg.n_heads * cfg.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        inter = cfg.intermediate or 2 * cfg.hidden
        self.up = nn.Linear(cfg.hidden, inter, bias=False)
        self.down = nn.Linear(inter, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, rotary):
        x = x + self.attn(self.attn_norm(x), cos, sin, rotary)
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nn.Module):
    def __init__(self, cfg: TinyConfig | None = None):
        super().__init__()
        cfg = cfg or TinyConfig()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.rotary = Rotary(cfg) if cfg.rope != "none" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self._init_weights()
        self.eval()

    @torch.no_grad()
    def _init_weights(self):
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name == "embed.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:   # projections and (non-zero) biases
                p.copy_(self.cfg.init_std * torch.randn(p.shape, generator=gen))

    def forward(self, input_ids, position_ids=None):
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        x = self.embed(input_ids)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.tables(position_ids)
        for block in self.blocks:
            x = block(x, cos, sin, self.rotary)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def greedy_reference(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence each step (no cache)."""
    tokens = input_ids
    for _ in range(max_new_tokens):
        nxt = model(tokens)[:, -1].argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens
