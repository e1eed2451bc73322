"""How good a converted model is, and how to make it better.

``windows`` (fixed windows of real text), ``evaluate`` (perplexity, KL and top-1 agreement to the
original), ``passkey`` (long-context retrieval), ``recovery`` (layer-wise refits), ``distillation``
(end-to-end KL to the original's logits), ``selfgen`` (training text sampled from the original).
"""
from .evaluate import TextQuality, logits_of, text_quality
from .passkey import PasskeyConfig, passkey
from .windows import calibration_windows, held_out_windows, training_windows

__all__ = ["PasskeyConfig", "TextQuality", "calibration_windows", "held_out_windows", "logits_of", "passkey",
           "text_quality", "training_windows"]
