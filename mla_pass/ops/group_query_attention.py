"""Attention over a preallocated key/value cache as one op: ``mla_pass::group_query_attention``.

It has the semantics of onnxruntime's ``com.microsoft::GroupQueryAttention`` (no rotary, no
quantized cache), so that export maps it to that one node (``export/onnx.py``) while PyTorch
runs the same math here. Letters: B batch, S new tokens, H query heads, Hkv kv heads, D head
size, C cache capacity, K = ``total_sequence_length``.

    group_query_attention(query [B,S,H·D], key [B,S,Hkv·D], value [B,S,Hkv·D],
                          past_key [B,Hkv,C,D], past_value [B,Hkv,C,D],
                          seqlens_k int32 [B], total_sequence_length int32 [],
                          attention_bias [B|1, H|1, S, K], query_seqlens int32 [B],
                          num_heads, kv_num_heads, scale, softcap)
        → (out [B,S,H·D], present_key, present_value)   (present: past with the new tokens written)

Row b holds ``L = seqlens_k[b] + 1`` tokens after the step; its first ``Q = query_seqlens[b]``
new tokens are valid (the rest is right padding) and are written at ``[L − Q, L)``. Query s sits
at position ``L − Q + s`` and attends to keys ``j ≤ L − Q + s`` (causal, never beyond L), with
``scale·q·k`` [→ ``softcap·tanh(·/softcap)``] ``+ attention_bias[..., s, j]`` before the softmax;
query head h reads kv head ``h // (H / Hkv)``. Output rows of padding (s ≥ Q) are zero here and
unspecified in onnxruntime. onnxruntime reads only the first L keys of the cache, which is why
it is faster than masking the whole buffer; with ``query_seqlens`` given it also accepts several
new tokens per row after a past (without it, that needs batch 1).
"""
from __future__ import annotations

import torch


@torch.library.custom_op("mla_pass::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                          attention_bias: torch.Tensor, query_seqlens: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, _ = query.shape
    d = past_key.shape[-1]
    total = int(total_sequence_length)
    length = seqlens_k.long() + 1                    # tokens per row after this step
    valid = query_seqlens.long()
    start = length - valid                           # where the new tokens go
    present_key, present_value = past_key.clone(), past_value.clone()
    new_key = key.view(b, s, kv_num_heads, d).transpose(1, 2)
    new_value = value.view(b, s, kv_num_heads, d).transpose(1, 2)
    for row, (p, q) in enumerate(zip(start.tolist(), valid.tolist())):
        present_key[row, :, p:p + q] = new_key[row, :, :q]
        present_value[row, :, p:p + q] = new_value[row, :, :q]

    group = num_heads // kv_num_heads
    keys = present_key[:, :, :total].repeat_interleave(group, dim=1).float()
    values = present_value[:, :, :total].repeat_interleave(group, dim=1).float()
    q = query.view(b, s, num_heads, d).transpose(1, 2).float()
    scores = q @ keys.transpose(-1, -2) * scale                                  # [B, H, S, K]
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + attention_bias.float()
    key_pos = torch.arange(total, device=query.device)
    query_pos = start[:, None] + torch.arange(s, device=query.device)[None]        # [B, S]
    allowed = (key_pos[None, None] <= query_pos[..., None]) & (key_pos[None, None] < length[:, None, None])
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    out = (probs @ values).transpose(1, 2)                                        # [B, S, H, D]
    padding = torch.arange(s, device=query.device)[None] >= valid[:, None]
    out = out.masked_fill(padding[..., None, None], 0.0)
    return out.reshape(b, s, num_heads * d).to(query.dtype), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, attention_bias, query_seqlens,
      num_heads, kv_num_heads, scale, softcap):
    b, s, _ = query.shape
    return (query.new_empty(b, s, num_heads * past_value.shape[-1]), torch.empty_like(past_key),
            torch.empty_like(past_value))
