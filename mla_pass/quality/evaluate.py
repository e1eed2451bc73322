"""How good is a (converted) model: pure evaluation, no conversion and no CLI.

- ``text_quality(model, ids, reference)``: perplexity on fixed windows of held-out text, and
  against a reference model (the original) top-1 next-token agreement and KL(reference ‖ model),
  computed window by window and in position chunks so memory stays bounded by one window's logits.
- ``passkey(model, tokenizer, PasskeyConfig())``: a 5-digit number hidden at several depths in
  filler text, asked back at the end; the score is the fraction of exact greedy retrievals.

Windows come from ``lcet10.txt`` starting at token 2000 (its header is skipped); the text is
never used for calibration or training (those use ``alice29.txt``; distillation also
``asyoulik.txt`` and ``plrabn12.txt``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


# -- perplexity, agreement, KL --------------------------------------------------------------------
@dataclass
class TextQuality:
    """Args:
        perplexity: exp of the mean next-token negative log-likelihood (L−1 targets per window).
        agreement: fraction of positions where the model's top-1 token equals the reference's.
        kl: mean over positions of KL(reference ‖ model), in nats.
        reference_perplexity: the reference's perplexity on the same windows.
    """
    perplexity: float
    agreement: float | None
    kl: float | None
    windows: int
    length: int
    seconds: float
    reference_perplexity: float | None = None


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] from an ``MLAModel``, a Hugging Face causal LM or a plain decoder module."""
    from ..frontend.capture import is_hf_model
    out = model(input_ids=ids, use_cache=False) if is_hf_model(model) else model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def text_quality(model, ids: torch.Tensor, reference=None, *, chunk: int = 256, progress: bool = True) -> TextQuality:
    """Perplexity of ``model`` on token windows ``ids`` [N, L]; with ``reference`` also top-1
    agreement and KL(reference ‖ model), both averaged over all N·L positions.

    Example:
        >>> q = text_quality(mla, held_out_windows(tok, 8, 512), reference=model)   # doctest: +SKIP
        >>> q.perplexity, q.agreement, q.kl                                           # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be token windows [N, L] with L >= 2, got {tuple(ids.shape)}")
    device = device_of(model)
    nll, ref_nll, agree, kl, positions, targets = 0.0, 0.0, 0, 0.0, 0, 0
    t0 = time.perf_counter()
    for window in tqdm(ids, desc="evaluating", disable=not progress, leave=False):
        w = window[None].to(device)
        logits = logits_of(model, w)[0]                                       # [L, V]
        ref_logits = logits_of(reference, w.to(device_of(reference)))[0].to(logits.device) \
            if reference is not None else None
        for s in range(0, logits.shape[0], chunk):
            lp = logits[s:s + chunk].double().log_softmax(-1)                 # [c, V]
            tgt = window[s + 1:s + chunk + 1].to(lp.device)                   # next tokens (one fewer at the end)
            nll -= lp[: len(tgt)].gather(-1, tgt[:, None]).sum().item()
            targets += len(tgt)
            if ref_logits is not None:
                ref = ref_logits[s:s + chunk].double().log_softmax(-1)
                ref_nll -= ref[: len(tgt)].gather(-1, tgt[:, None]).sum().item()
                agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
                kl += (ref.exp() * (ref - lp)).sum().item()
            positions += lp.shape[0]
    return TextQuality(
        perplexity=math.exp(nll / targets),
        agreement=agree / positions if reference is not None else None,
        kl=kl / positions if reference is not None else None,
        windows=ids.shape[0], length=ids.shape[1], seconds=time.perf_counter() - t0,
        reference_perplexity=math.exp(ref_nll / targets) if reference is not None else None)


def device_of(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


