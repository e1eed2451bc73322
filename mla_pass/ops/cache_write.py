"""Writing new tokens into a preallocated cache buffer, as one op that exporters can map.

``cache_write(buffer, new, write_index, axis)`` returns ``buffer`` with ``new`` (S tokens along
``axis``) written at ``write_index[b]`` for each batch row. It is a custom op so that export keeps
it as one node: ONNX lowers it to ``TensorScatter`` (opset 24), which onnxruntime runs in place
when the caller binds past and present to the same buffer. In PyTorch it returns a new tensor
(functional), so programs stay pure for tracing.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("mla_pass::cache_write", mutates_args=())
def cache_write(buffer: torch.Tensor, new: torch.Tensor, write_index: torch.Tensor, axis: int) -> torch.Tensor:
    out = buffer.clone()
    s = new.shape[axis]
    for b, start in enumerate(write_index.tolist()):
        out[b].narrow(axis - 1, int(start), s).copy_(new[b])
    return out


@cache_write.register_fake
def _(buffer, new, write_index, axis):
    return torch.empty_like(buffer)
