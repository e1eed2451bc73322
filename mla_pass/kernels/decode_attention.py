"""One-token attention over the MHA2MLA cache: the fused Triton kernel and its plain reference.

Letters: B batch, H query heads, Hkv kv heads, T cache positions, C latent width, R rotated values
of the kept rope slots (may be 0; one rope key per position, shared by every head).

    decode_attention(q_latent [B,H,C], q_rope [B,H,R], latent [B,T,C], rope_key [B,1,T,R], scale)
        s_{h,t} = ((q_latent_h·latent_t [+ q_bias_h]) [· key_scale_{kv(h),t}] + q_rope_h·rope_key_t)·scale
        s       = softcap·tanh(s/softcap) if softcap [+ additive key mask]
        a_{h,·} = softmax over the valid t: start_b ≤ t < lengths_b and, if given, a bool key mask
        out_h   = Σ_t a_{h,t} latent_t                                  → [B,H,C], latent's dtype

This is ``math.attention.absorbed_attention`` for one query after the W_uk absorption and before
W_uv (see ``dispatch.absorbed_decode``). ``start`` and ``lengths`` bound the work of each
sequence (left-padded and right-ragged batches: split-K divides [start, lengths) evenly); the key
mask, read one byte per position, covers any other pattern. A sequence with nothing valid gives
NaN, as the PyTorch softmax does.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import Sequence

import torch

log = logging.getLogger(__name__)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACC_BUDGET = 8192          # fp32 accumulator elements per program (BLOCK_H × C_CHUNK): 64 registers/thread at 4 warps


@dataclass(frozen=True)
class DecodeKernelConfig:
    """Tiling of the kernel; ``None`` picks a default from the shapes (see ``_plan``).

    num_splits: T-chunks per sequence (flash-decoding split-K); default: about two programs per SM.
    block_t: cache positions per tile. block_h: query heads per program (≥ 16, tl.dot's minimum).
    c_chunk: latent columns per tile; when C is wider, programs split the output columns and loop
    over C in chunks for the scores.
    """
    num_splits: int | None = None
    block_t: int | None = None
    block_h: int | None = None
    c_chunk: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_t", "block_h", "c_chunk"):
            v = getattr(self, name)
            if v is not None and (v < 16 or v & (v - 1)):
                raise ValueError(f"DecodeKernelConfig.{name} must be a power of two ≥ 16, got {v}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"DecodeKernelConfig.num_splits must be ≥ 1, got {self.num_splits}")


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.startswith("cuda") else 1


@functools.lru_cache(maxsize=64)
def _kv_map(kv_heads: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor(kv_heads, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class _Plan:
    block_h: int
    block_t: int
    c_chunk: int
    n_chunks: int
    rspan: int
    num_splits: int
    head_blocks: int


def _plan(cfg: DecodeKernelConfig, b: int, h: int, t: int, c: int, r: int, kv_heads: tuple[int, ...],
          sm_count: int) -> _Plan:
    block_h = cfg.block_h or min(64, _pow2(h))
    # narrow latents (c ≤ 128) still split the output columns into 32-wide programs: on an H100 the
    # extra parallelism beat one program per head block 1.9-2.7× (benchmarks/gpu_kernel_tune.py)
    c_chunk = cfg.c_chunk or (32 if c <= 128 else min(_pow2(c), max(32, _ACC_BUDGET // block_h)))
    block_t = cfg.block_t or (64 if c_chunk <= 128 else 32)
    head_blocks = -(-h // block_h)
    n_chunks = -(-c // c_chunk)
    rspan = _pow2(r) if r else 0
    splits = cfg.num_splits
    if splits is None:   # fill the GPU (~2 programs per SM), but keep ≥ 4 tiles per split
        programs = b * head_blocks * n_chunks
        splits = max(1, min(64, -(-2 * sm_count // programs), -(-t // (4 * block_t))))
    return _Plan(block_h, block_t, c_chunk, n_chunks, rspan, splits, head_blocks)


def _check(q_latent, q_rope, latent, rope_key, lengths, start, key_mask, q_bias, key_scale, kv_head_of_query):
    if q_latent.dim() != 3 or latent.dim() != 3 or q_rope.dim() != 3 or rope_key.dim() != 4:
        raise ValueError("decode_attention expects q_latent [B,H,C], q_rope [B,H,R], latent [B,T,C], "
                         f"rope_key [B,1,T,R]; got {tuple(q_latent.shape)}, {tuple(q_rope.shape)}, "
                         f"{tuple(latent.shape)}, {tuple(rope_key.shape)}")
    b, h, c = q_latent.shape
    t, r = latent.shape[1], rope_key.shape[3]
    hkv = key_scale.shape[1] if key_scale is not None else None
    if kv_head_of_query is None:
        if hkv is not None and (hkv == 0 or h % hkv):
            raise ValueError(f"decode_attention: {h} query heads over {hkv} kv heads: pass kv_head_of_query")
        kv_head_of_query = [i // (h // hkv) for i in range(h)] if hkv else [0] * h
    kv_heads = tuple(int(j) for j in kv_head_of_query)
    hkv = hkv if hkv is not None else max(kv_heads, default=0) + 1
    if latent.shape != (b, t, c) or q_rope.shape[:2] != (b, h) or rope_key.shape != (b, 1, t, q_rope.shape[2]):
        raise ValueError(f"decode_attention: inconsistent shapes q_latent {tuple(q_latent.shape)}, q_rope "
                         f"{tuple(q_rope.shape)}, latent {tuple(latent.shape)}, rope_key {tuple(rope_key.shape)} "
                         "(the rope key is shared: [B,1,T,R])")
    if len(kv_heads) != h or not all(0 <= j < hkv for j in kv_heads):
        raise ValueError(f"decode_attention: kv_head_of_query must give each of the {h} query heads a kv head "
                         f"in [0, {hkv}), got {list(kv_heads)}")
    if latent.dtype not in _DTYPES:
        raise ValueError(f"decode_attention: latent dtype {latent.dtype} unsupported; use one of {_DTYPES}")
    for name, v, shape in (("lengths", lengths, (b,)), ("start", start, (b,)), ("key_mask", key_mask, (b, t)),
                           ("q_bias", q_bias, (b, h)), ("key_scale", key_scale, (b, hkv, t))):
        if v is not None and tuple(v.shape) != shape:
            raise ValueError(f"decode_attention: {name} must have shape {shape}, got {tuple(v.shape)}")
    devices = {x.device for x in (q_latent, q_rope, latent, rope_key, lengths, start, key_mask, q_bias, key_scale)
               if x is not None}
    if len(devices) != 1:
        raise ValueError(f"decode_attention: all tensors must be on one device, got {sorted(map(str, devices))}")
    return b, h, c, t, hkv, r, kv_heads


def decode_attention(q_latent_BHC: torch.Tensor, q_rope_BHR: torch.Tensor, latent_BTC: torch.Tensor,
                     rope_key_B1TR: torch.Tensor, scale: float, lengths_B: torch.Tensor | None = None, *,
                     start_B: torch.Tensor | None = None, key_mask_BT: torch.Tensor | None = None,
                     kv_head_of_query: Sequence[int] | None = None, softcap: float | None = None,
                     q_bias_BH: torch.Tensor | None = None, key_scale_BHkvT: torch.Tensor | None = None,
                     config: DecodeKernelConfig | None = None) -> torch.Tensor:
    """The fused kernel (see the module docstring). CUDA tensors, or CPU tensors when triton runs
    interpreted (``TRITON_INTERPRET=1`` before triton is first imported).

    Args:
        lengths_B / start_B: int tensors; sequence b attends to positions [start_b, lengths_b)
            (defaults: 0 and T).
        key_mask_BT: bool (True = attend) or float (added to the scaled, softcapped scores).
        kv_head_of_query: host ints, the kv head of each query head, which picks its row of
            ``key_scale_BHkvT`` (default h // (H // Hkv)).
        q_bias_BH: added to the latent score before ``key_scale_BHkvT`` multiplies it.
    Returns [B,H,C] in the latent's dtype; accumulation is fp32.
    """
    b, h, c, t, hkv, r, kv_heads = _check(q_latent_BHC, q_rope_BHR, latent_BTC, rope_key_B1TR, lengths_B,
                                          start_B, key_mask_BT, q_bias_BH, key_scale_BHkvT, kv_head_of_query)
    from triton.runtime.errors import OutOfResources

    from . import _triton_decode as K
    device = latent_BTC.device
    if K.INTERPRETED == latent_BTC.is_cuda:
        raise ValueError("decode_attention needs CUDA tensors (or CPU tensors under the Triton interpreter: "
                         f"TRITON_INTERPRET=1 before triton is imported); got {device} with "
                         f"interpreter {'on' if K.INTERPRETED else 'off'}")
    cfg = config or DecodeKernelConfig()
    key = (b, h, c, r, kv_heads, latent_BTC.dtype, str(device), cfg)
    while True:
        cfg = _SHRUNK.get(key, cfg)
        plan = _plan(cfg, b, h, t, c, r, kv_heads, _sm_count(str(device)))
        try:
            return _launch(K, cfg, plan, q_latent_BHC,
                           q_rope_BHR, latent_BTC, rope_key_B1TR, scale, lengths_B, start_B, key_mask_BT,
                           kv_heads, softcap, q_bias_BH, key_scale_BHkvT)
        except OutOfResources as e:     # shared memory / registers of this tiling
            if (smaller := _shrink(cfg, plan)) is None:
                raise
            _SHRUNK[key] = smaller
            log.debug("decode kernel: %s; retrying with %s", e, smaller)


_SHRUNK: dict[tuple, DecodeKernelConfig] = {}     # the tiling that fitted, per shape and requested config


def _shrink(cfg: DecodeKernelConfig, plan: _Plan) -> DecodeKernelConfig | None:
    """A smaller tiling after the GPU refused one for lack of shared memory: fewer pipeline
    stages first, then shorter T tiles, then narrower latent chunks; None when nothing is left."""
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=1)
    if plan.block_t > 16:
        return replace(cfg, block_t=plan.block_t // 2)
    if plan.c_chunk > 16:
        return replace(cfg, c_chunk=plan.c_chunk // 2)
    return None


def _launch(K, cfg, p, q_latent_BHC, q_rope_BHR, latent_BTC, rope_key_B1TR, scale, lengths_B, start_B,
            key_mask_BT, kv_heads, softcap, q_bias_BH, key_scale_BHkvT) -> torch.Tensor:
    b, h, c = q_latent_BHC.shape
    t, r = latent_BTC.shape[1], rope_key_B1TR.shape[3]
    device = latent_BTC.device

    start = start_B.to(torch.int32).contiguous() if start_B is not None else None
    end = lengths_B.to(torch.int32).contiguous() if lengths_B is not None else None
    kv_map = _kv_map(kv_heads, str(device))
    mask = key_mask_BT
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    out = torch.empty(b, h, c, dtype=latent_BTC.dtype, device=device)
    if p.num_splits > 1:
        acc = torch.empty(b, p.num_splits, h, c, dtype=torch.float32, device=device)
        m_ws = torch.empty(b, p.num_splits, h, dtype=torch.float32, device=device)
        l_ws = torch.empty_like(m_ws)
    else:
        acc, m_ws, l_ws = out, out, out     # unused
    dummy = out                              # stands in for absent optional tensors
    stride = lambda x, n: x.stride() if x is not None else (0,) * n  # noqa: E731
    precision = "ieee" if latent_BTC.dtype == torch.float32 else "tf32"   # fp16/bf16: ignored
    grid = (p.head_blocks * p.n_chunks, p.num_splits, b)
    q_rope, rope_key = (q_rope_BHR, rope_key_B1TR) if r else (dummy, dummy)   # no pointer to empty storage
    K._split_kernel[grid](
        q_latent_BHC, q_rope, latent_BTC, rope_key, kv_map,
        start if start is not None else kv_map, end if end is not None else kv_map,
        mask if mask is not None else dummy, q_bias_BH if q_bias_BH is not None else dummy,
        key_scale_BHkvT if key_scale_BHkvT is not None else dummy,
        acc, m_ws, l_ws, out,
        h, c, r, t, float(scale), float(softcap or 1.0),
        *q_latent_BHC.stride(), *q_rope_BHR.stride(), *latent_BTC.stride(),
        rope_key_B1TR.stride(0), *rope_key_B1TR.stride()[2:],         # one shared rope head: no head stride
        *stride(mask, 2), *stride(q_bias_BH, 2), *stride(key_scale_BHkvT, 3),
        *(acc.stride() if p.num_splits > 1 else (0,) * 4), *out.stride(),
        NUM_SPLITS=p.num_splits, BLOCK_H=p.block_h, BLOCK_T=p.block_t, C_CHUNK=p.c_chunk, N_CHUNKS=p.n_chunks,
        RSPAN=p.rspan, HAS_START=start is not None, HAS_END=end is not None, HAS_MASK=mask is not None, MASK_BOOL=mask is not None and key_mask_BT.dtype == torch.bool,
        HAS_QB=q_bias_BH is not None, HAS_KS=key_scale_BHkvT is not None, SOFTCAP=softcap is not None,
        DOT_FP32=K.INTERPRETED, PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if p.num_splits > 1:
        block_c = min(_pow2(c), 256)
        K._combine_kernel[(-(-c // block_c), h, b)](
            acc, m_ws, l_ws, out, h, c, *acc.stride(), *out.stride(),
            NUM_SPLITS=p.num_splits, SPLITS_PAD=_pow2(p.num_splits, 2), BLOCK_C=block_c)
    return out


def decode_attention_reference(q_latent_BHC, q_rope_BHR, latent_BTC, rope_key_B1TR, scale: float,
                               lengths_B=None, *, start_B=None, key_mask_BT=None, kv_head_of_query=None,
                               softcap=None, q_bias_BH=None, key_scale_BHkvT=None, config=None):
    """The same contract in plain PyTorch (fp32 math): the CPU path and the kernel's test oracle."""
    b, h, _ = q_latent_BHC.shape
    t = latent_BTC.shape[1]
    hkv = key_scale_BHkvT.shape[1] if key_scale_BHkvT is not None else 1
    if kv_head_of_query is None:
        kv_head_of_query = [i // (h // hkv) for i in range(h)]
    kv = torch.as_tensor(list(kv_head_of_query), dtype=torch.long, device=latent_BTC.device)
    lat = latent_BTC.float()
    s = torch.einsum("bhc,btc->bht", q_latent_BHC.float(), lat)
    if q_bias_BH is not None:
        s = s + q_bias_BH.float()[:, :, None]
    if key_scale_BHkvT is not None:
        s = s * key_scale_BHkvT.float().index_select(1, kv)
    s = s + torch.einsum("bhr,btr->bht", q_rope_BHR.float(), rope_key_B1TR[:, 0].float())
    s = s * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(t, device=latent_BTC.device)
    valid = torch.ones(b, t, dtype=torch.bool, device=latent_BTC.device)
    if start_B is not None:
        valid &= pos[None] >= start_B[:, None]
    if lengths_B is not None:
        valid &= pos[None] < lengths_B[:, None]
    if key_mask_BT is not None:
        if key_mask_BT.dtype == torch.bool:
            valid &= key_mask_BT
        else:
            s = s + key_mask_BT.float()[:, None, :]
    probs = torch.softmax(s.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("bht,btc->bhc", probs, lat).to(latent_BTC.dtype)
