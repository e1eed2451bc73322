"""Where the converted model's absorbed decode picks the fused kernel or the PyTorch math.

    absorbed_decode(same arguments as math.attention.absorbed_attention, kv_heads=host ints)
        kernel_refusal(...) is None:  q_latent = W_ukᵀ q_nope          (torch)
                                      o_latent = decode_attention(...)  (Triton, fused)
                                      out      = W_uv o_latent + b_v    (torch)
        otherwise:                    absorbed_attention_mqa(...)       (PyTorch: multi-query, heads as rows,
                                                                         what ONNX export traces), or
                                      absorbed_attention(...)           (softcap / RMS-normalised keys)

The kernel is used only when every precondition holds; each refusal is a reason string (logged
once per reason at DEBUG level). Preconditions, all read from shapes/dtypes/devices (no data-
dependent check, so no host-device sync on the decode path):
  - tensors on a CUDA device and triton importable; not inside torch.compile / torch.export tracing
    (the kernel is not a registered custom op, so traced graphs keep the PyTorch form);
  - one query (S = 1) and ``is_causal`` False: prefill keeps the decompressed SDPA path;
  - mask None, or one row of keys per sequence ([B or 1, 1, 1, T]; bool = attend, or float =
    added); per-head or per-query masks fall back;
  - latent dtype fp16, bf16 or fp32; no autograd (the kernel has no backward);
  - where it was measured to pay (``KERNEL_MAX_LATENT``, ``KERNEL_MIN_CACHE_BYTES`` below).
Softcapping, a key bias, RMS-normalised keys (key_scale), any kv-head map and a rope width of 0
are handled in the kernel. A bool mask is passed whole (holes are honoured) and also gives each
sequence's first attended position, so left padding costs no latent reads: one argmax per decode
step, shared by the layers that receive the same mask tensor.
"""
from __future__ import annotations

import importlib.util
import logging
import weakref
from typing import Callable, Sequence

import torch

from ..math.absorbed_mqa import absorbed_attention_mqa
from ..math.absorbed_mqa import eligible as mqa_eligible
from ..math.attention import absorbed_attention, key_bias_score, latent_output, latent_query
from ..math.int8_cache import ZERO_POINT, dequantize_per_token

log = logging.getLogger(__name__)
_logged: set[str] = set()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_refusal(q_nope_BHSN, latent_BTC, mask, is_causal: bool, *tensors) -> str | None:
    """Why the fused kernel cannot take this call, or None when it can."""
    if q_nope_BHSN.shape[2] != 1:
        return f"{q_nope_BHSN.shape[2]} queries: the kernel is for one-token decode steps"
    if is_causal:
        return "is_causal with a single query (top-left causal): only the PyTorch form handles it"
    if latent_BTC.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"latent dtype {latent_BTC.dtype}"
    if mask is not None:
        b, t = latent_BTC.shape[:2]
        if mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[0] not in (1, b) or mask.shape[3] != t:
            return f"mask of shape {tuple(mask.shape)}: the kernel takes one key row per sequence [B,1,1,{t}]"
        if mask.dtype != torch.bool and not mask.is_floating_point():
            return f"mask dtype {mask.dtype}"
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q_nope_BHSN, latent_BTC, *tensors)):
        return "autograd is recording: the kernel has no backward"
    if torch.compiler.is_compiling():
        return "inside torch.compile/torch.export tracing: the traced graph keeps the PyTorch form"
    if not latent_BTC.is_cuda:
        return f"tensors on {latent_BTC.device}, the kernel needs CUDA"
    if not triton_available():
        return "triton is not installed (pip install 'mla-pass[triton]')"
    c = latent_BTC.shape[-1]
    if c > KERNEL_MAX_LATENT:
        return f"latent width {c} > {KERNEL_MAX_LATENT}: the PyTorch form is faster there (H100, gpu_decode.py)"
    cache_bytes = sum(x.numel() * x.element_size() for x in (latent_BTC, *tensors[1:2]) if x is not None)
    if cache_bytes < KERNEL_MIN_CACHE_BYTES:
        return f"{cache_bytes / 2**20:.0f} MiB of cache: below {KERNEL_MIN_CACHE_BYTES >> 20} MiB launch costs dominate"
    return None


# Where the kernel is used, from benchmarks/gpu_decode.py on an H100 (bf16): with the latent wider
# than 1024 (Llama-2-7B-like d_kv=64) the PyTorch form was ~3× faster at every size; below ~100 MB
# of cache per layer and step both are bound by launch/host costs and PyTorch was as fast or faster;
# above it the kernel won up to 2.1× (e.g. 2.7 vs 3.7 ms, B=16, T=64k, c=512).
KERNEL_MAX_LATENT = 1024
KERNEL_MIN_CACHE_BYTES = 96 << 20


_first_cache: list = [None, -1, None]     # weakref to the last mask, its _version, its first positions


def first_attended(mask_B11T: torch.Tensor) -> torch.Tensor:
    """Per row, the first True position of a bool decode mask (0 for a row with none) → int32 [B].
    Remembered for the last mask tensor seen (every layer of a step gets the same one)."""
    ref, version, start = _first_cache
    if ref is not None and ref() is mask_B11T and version == mask_B11T._version:
        return start
    start = mask_B11T[:, 0, 0, :].to(torch.uint8).argmax(dim=1).to(torch.int32)   # argmax: the first maximum
    _first_cache[:] = [weakref.ref(mask_B11T), mask_B11T._version, start]
    return start


def fused_absorbed(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_B1TR, up_key_HkvNC, up_value_HkvVC,
                   b_value_HkvV, kv_head_of_query, kv_heads: Sequence[int], scale: float, mask=None, softcap=None,
                   b_key_HkvN=None, key_scale_BHkvT=None, *, impl: Callable | None = None):
    """The absorbed form for S = 1 around a ``decode_attention``-contract core (``impl``; default
    the Triton kernel). Tests pass ``decode_attention_reference`` to check this glue on CPU."""
    from .decode_attention import decode_attention
    impl = impl or decode_attention
    b, t = latent_BTC.shape[:2]
    q_latent_BHC = latent_query(q_nope_BHSN, up_key_HkvNC, kv_head_of_query)[:, :, 0]
    q_bias_BH = key_bias_score(q_nope_BHSN, b_key_HkvN, kv_head_of_query)[:, :, 0, 0] if b_key_HkvN is not None else None
    key_mask_BT = start_B = None
    if mask is not None:
        start_B = first_attended(mask).expand(b) if mask.dtype == torch.bool else None
        key_mask_BT = mask[:, 0, 0, :].expand(b, t)
    out_latent_BHC = impl(q_latent_BHC, q_rope_BHSR[:, :, 0], latent_BTC, k_rope_B1TR, scale, start_B=start_B,
                          key_mask_BT=key_mask_BT, kv_head_of_query=kv_heads, softcap=softcap,
                          q_bias_BH=q_bias_BH, key_scale_BHkvT=key_scale_BHkvT)
    return latent_output(out_latent_BHC[:, :, None], up_value_HkvVC, b_value_HkvV, kv_head_of_query)


def absorbed_decode(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_B1TR, up_key_HkvNC, up_value_HkvVC,
                    b_value_HkvV, kv_head_of_query, scale: float, mask=None, is_causal=False, softcap=None,
                    b_key_HkvN=None, key_scale_BHkvT=None, *, kv_heads: Sequence[int], use_kernel: bool = True,
                    latent_scale_BT=None, latent_zero_point: int = ZERO_POINT):
    """``absorbed_attention`` with the fused kernel where its preconditions hold (module docstring).
    ``latent_scale_BT``: the latent is an 8-bit cache (``math/int8_cache.py``; zero point 128, or 8
    for the unpacked 4-bit one); the multi-query form folds the scales in, every other path
    dequantizes first."""
    mqa = mqa_eligible(softcap, key_scale_BHkvT, kv_heads, up_key_HkvNC.shape[0])
    if latent_scale_BT is not None:
        if mqa:
            return absorbed_attention_mqa(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_B1TR, up_key_HkvNC,
                                          up_value_HkvVC, b_value_HkvV, kv_head_of_query, scale, mask, is_causal,
                                          latent_scale_BT, latent_zero_point)
        latent_BTC = dequantize_per_token(latent_BTC, latent_scale_BT, latent_zero_point)
    reason = "disabled" if not use_kernel else kernel_refusal(
        q_nope_BHSN, latent_BTC, mask, is_causal, q_rope_BHSR, k_rope_B1TR, up_key_HkvNC, up_value_HkvVC,
        b_value_HkvV, b_key_HkvN, key_scale_BHkvT)
    if reason is None:
        return fused_absorbed(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_B1TR, up_key_HkvNC, up_value_HkvVC,
                              b_value_HkvV, kv_head_of_query, kv_heads, scale, mask, softcap, b_key_HkvN,
                              key_scale_BHkvT)
    if latent_BTC.is_cuda and reason not in _logged:
        _logged.add(reason)
        log.debug("latent decode kernel not used: %s", reason)
    if mqa:
        return absorbed_attention_mqa(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_B1TR, up_key_HkvNC,
                                      up_value_HkvVC, b_value_HkvV, kv_head_of_query, scale, mask, is_causal)
    return absorbed_attention(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_B1TR, up_key_HkvNC, up_value_HkvVC,
                              b_value_HkvV, kv_head_of_query, scale, mask, is_causal, softcap, b_key_HkvN,
                              key_scale_BHkvT)
