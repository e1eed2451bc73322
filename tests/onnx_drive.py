"""Drive an exported folder with plain onnxruntime next to the PyTorch step program it came from."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mla_pass.runtime.manifest import Manifest

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
DECODE_STEPS = 32


def session(source):
    """An onnxruntime CPU session (1 thread) for an exported folder, a model file or an onnx.ModelProto."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    if hasattr(source, "SerializeToString"):
        source = source.SerializeToString()
    elif Path(source).is_dir():
        source = str(Path(source) / "model.onnx")
    else:
        source = str(source)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def drive(folder, torch_step, empty_cache, ids: torch.Tensor, steps: int = DECODE_STEPS):
    """Greedy decode with both programs side by side; returns (max |Δlogits| per step, ort tokens, torch tokens)."""
    manifest = Manifest.read(folder)
    session_ = session(folder)
    b, s = ids.shape
    buffer = s + steps + 1 if manifest.cache_update == "in_place" else 0   # preallocated, or grown by concat
    ort_cache = [np.zeros(e.concrete_shape(b, buffer), np.float32) for e in manifest.cache]
    torch_cache = empty_cache(b)
    mask = torch.ones(b, s, dtype=torch.long)
    cur, errors, ort_tokens, torch_tokens = ids, [], [], []
    cur_ort = ids
    for _ in range(steps + 1):
        pos = (mask.cumsum(-1) - 1)[:, -cur.shape[1]:]
        feeds = {"input_ids": cur_ort.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        feeds.update({e.input: c for e, c in zip(manifest.cache, ort_cache)})
        logits_ort, *ort_cache = session_.run(None, feeds)
        with torch.no_grad():
            logits_t, *torch_cache = torch_step(cur, pos, mask, *torch_cache)
        errors.append(float(np.abs(logits_ort[:, -1] - logits_t[:, -1].numpy()).max()))
        ort_tokens.append(logits_ort[:, -1].argmax(-1))
        torch_tokens.append(logits_t[:, -1].argmax(-1).numpy())
        cur_ort = torch.from_numpy(ort_tokens[-1])[:, None]
        cur = torch.from_numpy(torch_tokens[-1])[:, None]
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
    return errors, np.stack(ort_tokens, 1), np.stack(torch_tokens, 1)
