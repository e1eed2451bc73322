"""Tiny Hugging Face models for structural tests."""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config


def tiny_llama(n_kv=2, layers=2, seed=0, bias=False, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=n_kv, attention_bias=bias, **kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_mistral(seed=0, sliding_window=None):
    from transformers import MistralConfig

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=sliding_window)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def byte_tokenizer():
    """A real (byte-level, one token per byte) fast tokenizer with 256 ids, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def hf_rotated_heads(model, tokens):
    """Per layer of a HF Llama-style model: (q, q_rot, k, k_rot) [B, H, S, D] in float64, from the
    attention modules' own projections and RoPE on ``tokens`` (a reference for calibration tests)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seen = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((mod, kwargs["hidden_states"], kwargs["position_embeddings"])),
        with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    out = []
    with torch.no_grad():
        for attn, x, (cos, sin) in seen:
            b, s, _ = x.shape
            q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2).double()
            k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2).double()
            q_rot, k_rot = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
            out.append((q, q_rot, k, k_rot))
    return out
