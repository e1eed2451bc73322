"""``mla_pass::cache_append``: Hugging Face ``DynamicLayer``'s cache update as one op.

Eager: exactly DynamicLayer's two ``cat`` along the token axis (same values, same dtype). Fake:
shape-agnostic in the stored tensors (``[B, X, T, W]`` + S new tokens → full-width
``[B, Hkv, T+S, Dh]``), so dynamo can trace a graph whose slots hold compressed tensors.
Autograd splits gradients back onto stored and new tokens like ``cat``'s. Why it exists and who
calls it: ``dynamo/hf_cache.py``.
"""
from __future__ import annotations

import torch
from torch import Tensor

OP_NAMESPACE = "mla_pass"


def _stored_length(stored: Tensor) -> int:
    """Tokens held by a stored slot; DynamicLayer starts from a 1-D empty tensor."""
    return stored.shape[-2] if stored.dim() >= 2 else 0


@torch.library.custom_op(f"{OP_NAMESPACE}::cache_append", mutates_args=())
def cache_append(stored_k: Tensor, stored_v: Tensor, new_k: Tensor, new_v: Tensor) -> tuple[Tensor, Tensor]:
    """DynamicLayer's update: (cat(stored_k, new_k), cat(stored_v, new_v)) along the token axis."""
    return torch.cat([stored_k, new_k], dim=-2), torch.cat([stored_v, new_v], dim=-2)


@cache_append.register_fake
def _cache_append_fake(stored_k, stored_v, new_k, new_v):
    k = new_k.new_empty(*new_k.shape[:-2], _stored_length(stored_k) + new_k.shape[-2], new_k.shape[-1])
    v = new_v.new_empty(*new_v.shape[:-2], _stored_length(stored_v) + new_v.shape[-2], new_v.shape[-1])
    return k, v


def _setup_context(ctx, inputs, output):
    stored_k, stored_v, _, _ = inputs
    ctx.lengths = (_stored_length(stored_k), _stored_length(stored_v))
    ctx.stored_dims = (stored_k.dim(), stored_v.dim())


def _backward(ctx, grad_k, grad_v):
    grads = []
    for grad, t, dim in ((grad_k, ctx.lengths[0], ctx.stored_dims[0]), (grad_v, ctx.lengths[1], ctx.stored_dims[1])):
        grads.append(grad[..., :t, :] if dim >= 2 else None)
    return grads[0], grads[1], grad_k[..., ctx.lengths[0]:, :], grad_v[..., ctx.lengths[1]:, :]


cache_append.register_autograd(_backward, setup_context=_setup_context)

CACHE_APPEND = torch.ops.mla_pass.cache_append.default
