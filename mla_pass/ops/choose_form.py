"""Choosing a site's form by the number of new tokens, as one op that the ONNX export turns into an ``If``.

``choose_form(x, one_token, prompt)`` returns ``one_token`` when ``x`` [B, S, ·] holds one token
and ``prompt`` otherwise. An exported program computes both inputs; ``export/branches.py`` then
moves what only each of them needs into the two branches of one ONNX ``If`` on S == 1, so a call
runs one form. (``torch.cond`` says the same, but tracing it cost ~8 s per site; this op traces as
fast as any other.) Eager programs never call it: they pick the form in Python.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("mla_pass::choose_form", mutates_args=())
def choose_form(x: torch.Tensor, one_token: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    return (one_token if x.shape[1] == 1 else prompt).clone()


@choose_form.register_fake
def _(x, one_token, prompt):
    return torch.empty_like(prompt)
