"""Integer matrix product as one op that exporters can map: ``mla_pass::matmul_integer``.

``matmul_integer(a, b, a_zero_point, b_zero_point)`` = ``(a − a_zp) @ (b − b_zp)`` in int32, for
uint8/int8 ``a`` and ``b`` (batched like ``torch.matmul``). It has the semantics of ONNX
``MatMulInteger`` and is exported as that one node (``export/onnx.py``), which onnxruntime runs
with MLAS's int8 GEMM (u8×s8 and u8×u8 use the VNNI dot products; an int8 ``a`` is several
times slower there, which is why the int8 latent cache is stored as uint8 codes + 128).
PyTorch computes it exactly in float64 (products of 8-bit codes summed over K < 2^37 terms).
"""
from __future__ import annotations

import torch

EIGHT_BIT = (torch.uint8, torch.int8)


@torch.library.custom_op("mla_pass::matmul_integer", mutates_args=())
def matmul_integer(a: torch.Tensor, b: torch.Tensor, a_zero_point: int, b_zero_point: int) -> torch.Tensor:
    if a.dtype not in EIGHT_BIT or b.dtype not in EIGHT_BIT:
        raise TypeError(f"matmul_integer takes uint8/int8 operands, got {a.dtype} and {b.dtype}")
    for x, zp in ((a, a_zero_point), (b, b_zero_point)):
        if zp and (x.dtype != torch.uint8 or not 0 < zp < 256):
            raise ValueError(f"a nonzero zero point must be a uint8 value of a uint8 operand, got {zp} for {x.dtype}")
    out = (a.double() - a_zero_point) @ (b.double() - b_zero_point)
    return out.to(torch.int32)


@matmul_integer.register_fake
def _(a, b, a_zero_point, b_zero_point):
    return torch.empty(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                       dtype=torch.int32, device=a.device)
