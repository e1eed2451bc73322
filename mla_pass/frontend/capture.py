"""Model → a graph the pass can read.

``capture(model)`` runs ``torch.export`` on the model's forward (token ids and positions in,
logits out), with batch and sequence dynamic, and returns the unlifted ``GraphModule`` plus a
recorded example run (every node's value) that the matcher uses for shapes and probing.

Accepted models: a Hugging Face ``PreTrainedModel`` (called with ``use_cache=False``), or any
``nn.Module`` decoder whose forward takes ``input_ids`` (and, for cached decoding,
``position_ids``) and returns logits, an object with ``.logits``, or a tuple whose first item
is the logits.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import graph as G

logger = logging.getLogger(__name__)

# Example sizes used for tracing and probing. Sequence 11 is prime and distinct from common
# head counts, so shapes tell batch, heads and sequence apart unambiguously.
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 11


class CaptureError(ValueError):
    pass


@dataclass
class Captured:
    gm: fx.GraphModule                 # placeholders: input_ids[, position_ids]; output: logits
    env: dict                          # node → value on the example inputs
    example_inputs: tuple
    takes_positions: bool
    vocab_size: int
    source: dict                       # how to rebuild the model (for save/load)
    generation: dict                   # eos_token_id / pad_token_id, where the model says


class _LogitsOnly(torch.nn.Module):
    """Calls a decoder and returns only its logits (HF models without their cache)."""

    def __init__(self, model: torch.nn.Module, takes_positions: bool, is_hf: bool):
        super().__init__()
        self.model = model
        self.takes_positions = takes_positions
        self.is_hf = is_hf

    def forward(self, input_ids, position_ids=None):
        kwargs = {"position_ids": position_ids} if self.takes_positions else {}
        if self.is_hf:
            kwargs["use_cache"] = False
        out = self.model(input_ids=input_ids, **kwargs) if self.is_hf else self.model(input_ids, **kwargs)
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def is_hf_model(model) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "to_dict") and hasattr(model, "generation_config")


def non_finite(named_tensors) -> list[str]:
    """``name (count)`` of every floating tensor in ``named_tensors`` holding NaN or inf."""
    out = []
    for name, t in named_tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                out.append(f"{name} ({bad} of {t.numel()} values)")
    return out


def capture(model: torch.nn.Module) -> Captured:
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module decoder, got {type(model).__name__}")
    bad = non_finite([*model.named_parameters(), *model.named_buffers()])
    if bad:       # probing would misread them (e.g. as "reads no single kv head"): say what they are
        raise CaptureError(f"{type(model).__name__} has weights holding NaN or inf, so nothing computed from it can be "
                           f"right: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; reload or repair the model")
    hf = is_hf_model(model)
    params = inspect.signature(model.forward).parameters
    takes_positions = "position_ids" in params
    vocab = _vocab_size(model)
    wrapper = _LogitsOnly(model, takes_positions, hf).eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=gen).to(device)
    pos = torch.arange(EXAMPLE_SEQ, device=device).expand(EXAMPLE_BATCH, -1).contiguous()
    dyn = torch.export.Dim.DYNAMIC
    args = (ids, pos) if takes_positions else (ids,)
    shapes = tuple({0: dyn, 1: dyn} for _ in args)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {e}") from e
    finally:
        model.train(was_training)
    gm = ep.module()
    _strip_guards(gm)
    env = G.record_values(gm, *args)
    source = {"kind": "transformers", "class": type(model).__name__, "config": model.config.to_dict()} if hf \
        else {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    gen_cfg = getattr(model, "generation_config", None)
    generation = {k: getattr(gen_cfg, k, None) for k in ("eos_token_id", "pad_token_id")} if gen_cfg else {}
    return Captured(gm=gm, env=env, example_inputs=args, takes_positions=takes_positions,
                    vocab_size=vocab, source=source, generation=generation)


def _strip_guards(gm: fx.GraphModule) -> None:
    """Drop export's input-shape guard call and metadata asserts (checks with no users that
    would pin shapes and dtypes); the pass checks what it relies on itself."""
    for n in list(gm.graph.nodes):
        if (n.op == "call_module" and n.target == "_guards_fn") or \
                (n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default):
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()


def _vocab_size(model) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if emb is None:
        raise CaptureError(f"{type(model).__name__} has no token embedding; cannot tell its vocabulary size")
    return emb.num_embeddings
