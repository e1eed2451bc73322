"""The vLLM model class of an exported folder: vLLM's Llama decoder with mla-pass latent attention.

Only vLLM imports this module (through ``plugin.register``). Each layer's attention computes the
folder's projections (``checkpoint.py``), turns the kept rope slots itself (``rotary.py``; never
vLLM's rotary op) and calls vLLM's ``MLAAttention``, which owns the paged latent cache (latent +
one shared rope key per token) and runs the backend's prefill and absorbed decode. The rest of the
layer (norms, MLP, residuals) is vLLM's ``LlamaDecoderLayer``, which also computes Qwen2's and
Mistral's layers: they differ from Llama's only in the attention replaced here.
"""
from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import MLAAttention
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.platforms import current_platform
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from .rotary import rotate_slots

CPU_KERNEL_WIDTHS = (512, 64)          # the only (latent, rope) split vLLM's C++ CPU_MLA decode kernel takes


class AnyWidthCPUMLAImpl(CPUMLAImpl):
    """CPU_MLA with its decode in torch: the absorbed query against every cached latent + rope row
    of each sequence's blocks, for any split of the head size (the C++ kernel takes 512 + 64 only)."""

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        decode = attn_metadata.decode
        seq_lens = decode.seq_lens.long()
        head = q.shape[-1]
        cache = kv_c_and_k_pe_cache.reshape(-1, CPUMLABackend.get_supported_kernel_block_sizes()[0], head)
        block = cache.shape[1]
        longest = int(seq_lens.max())
        blocks = decode.block_table[:, :-(-longest // block)].long()
        rows = cache[blocks].flatten(1, 2)[:, :longest]                                 # [B, T, L + R]
        scores = torch.einsum("bnh,bth->bnt", q.float(), rows.float()) * self.scale
        past_end = torch.arange(longest, device=q.device)[None, :] >= seq_lens[:, None]
        probs = scores.masked_fill(past_end[:, None, :], float("-inf")).softmax(-1)
        out = torch.einsum("bnt,btl->bnl", probs, rows[..., :self.kv_lora_rank].float())
        return out.to(q.dtype), None


class AnyWidthCPUMLABackend(CPUMLABackend):
    """vLLM's CPU_MLA backend (same cache layout, prefill and cache writes) for any head size."""

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []

    @staticmethod
    def get_impl_cls() -> type[AnyWidthCPUMLAImpl]:
        return AnyWidthCPUMLAImpl


def _load_heads_of_rank(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Keep this tensor-parallel rank's share of a tensor laid out heads first ([N·rows, ...])."""
    n = param.shape[0]
    param.data.copy_(loaded.narrow(0, get_tensor_model_parallel_rank() * n, n).to(param.dtype))


class MLAPassAttention(nn.Module):
    """One layer's latent attention from an mla-pass export; called as ``(positions, hidden_states)``."""

    def __init__(self, config, hidden_size: int, num_heads: int, cache_config=None, quant_config=None,
                 prefix: str = "", **_llama_attention_args):
        super().__init__()
        mla = config.mla_pass
        layer = int(prefix.split(".")[-2])             # "model.layers.{i}.self_attn"
        tp = get_tensor_model_parallel_world_size()
        if num_heads % tp:
            raise ValueError(f"{num_heads} query heads do not split over {tp} tensor-parallel ranks")
        self.n = num_heads // tp
        self.dh, self.dv = config.qk_nope_head_dim, config.v_head_dim
        self.latent, self.rope = config.kv_lora_rank, config.qk_rope_head_dim
        self.rope_scaling = float(mla["rope_scaling_factor"])
        q_bias = bool(mla["query_bias"])
        self.q_nope_proj = ColumnParallelLinear(hidden_size, num_heads * self.dh, bias=q_bias,
                                                quant_config=quant_config, prefix=f"{prefix}.q_nope_proj")
        self.q_rope_proj = ColumnParallelLinear(hidden_size, num_heads * self.rope, bias=q_bias,
                                                quant_config=quant_config, prefix=f"{prefix}.q_rope_proj")
        self.kv_a_proj = ReplicatedLinear(hidden_size, self.latent + self.rope, bias=bool(mla.get("key_bias")),
                                          quant_config=quant_config, prefix=f"{prefix}.kv_a_proj")
        self.kv_b_proj = ColumnParallelLinear(self.latent, num_heads * (self.dh + self.dv), bias=False,
                                              quant_config=quant_config, prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(num_heads * self.dv, hidden_size, bias=bool(mla["output_bias"]),
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_rope_scale = nn.Parameter(torch.zeros(self.n, self.rope), requires_grad=False)
        self.q_rope_scale.weight_loader = _load_heads_of_rank
        self.rope_freq = nn.Parameter(torch.zeros(self.rope // 2, dtype=torch.float32), requires_grad=False)
        self.rope_freq.weight_loader = lambda p, w: p.data.copy_(w.float())     # float32 angles, as HF
        if mla["value_bias"]:
            self.v_bias = nn.Parameter(torch.zeros(self.n * self.dv), requires_grad=False)
            self.v_bias.weight_loader = _load_heads_of_rank
        else:
            self.v_bias = None
        any_width = current_platform.is_cpu() and (self.latent, self.rope) != CPU_KERNEL_WIDTHS
        self.mla_attn = MLAAttention(num_heads=self.n, scale=float(mla["scales"][layer]),
                                     qk_nope_head_dim=self.dh, qk_rope_head_dim=self.rope, v_head_dim=self.dv,
                                     q_lora_rank=None, kv_lora_rank=self.latent, kv_b_proj=self.kv_b_proj,
                                     cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
                                     attn_backend=AnyWidthCPUMLABackend if any_width else None)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        t = hidden_states.shape[0]
        q_nope = self.q_nope_proj(hidden_states)[0].view(t, self.n, self.dh)
        q_pe = self.q_rope_proj(hidden_states)[0].view(t, self.n, self.rope)
        q_pe = rotate_slots(q_pe, positions, self.rope_freq, self.rope_scaling) * self.q_rope_scale
        latent, k_pe = self.kv_a_proj(hidden_states)[0].split([self.latent, self.rope], dim=-1)
        k_pe = rotate_slots(k_pe, positions, self.rope_freq, self.rope_scaling)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = self.mla_attn(q, latent.contiguous(), k_pe.unsqueeze(1).contiguous(),
                            output_shape=(t, self.n * self.dv))
        if self.v_bias is not None:
            out = out + self.v_bias            # the values' bias: attention weights sum to 1
        return self.o_proj(out)[0]


class MLAPassDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, attn_layer_type=MLAPassAttention)


class MLAPassLlamaForCausalLM(LlamaForCausalLM):
    """A Llama-family model (Llama, Mistral, Qwen2, SmolLM2) converted by mla-pass."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=MLAPassDecoderLayer)
