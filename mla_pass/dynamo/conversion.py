"""The conversions the compile backend runs when it does not factorise from scratch.

``options={"checkpoint": DIR}``: a folder written by ``mla-pass convert``, ``mla-pass recover`` or
``MLAModel.save``: its plans and its trained latent weights (``persist.read_checkpoint``).
``options={"calibration": token_ids}``: the conversion ``mla_pass.convert(model, config,
calibration=token_ids)`` makes, computed once per model, config and tokens. Either way the
backend's modules are the conversion's own (same plans, same weights), so the compiled model
computes what ``mla_pass.load(DIR)`` / ``convert`` computes.

A dynamo site is paired with the conversion's site of the same layer (``SitePlan.layer``); the
plan must fit the site's shapes and RoPE layout, and every weight the rewritten graph still reads
(embeddings, MLP, norms, q/o projections) must equal the conversion's copy: a checkpoint of
another model, or of a recovery that trained weights outside the attention, is refused with a
message saying so, never run with mixed weights.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from ..config import MLAConfig
from ..modules.site_plan import SitePlan
from ..plan.build import site_module
from ..rewrite import MODULES

logger = logging.getLogger(__name__)

# capture() wraps the model (``_LogitsOnly.model``): the converted program's names carry this prefix
_CAPTURED_PREFIX = "model."


@dataclass
class Conversion:
    label: str                                   # for messages: where it came from
    config: MLAConfig
    plans: dict[int, SitePlan]
    tensors: dict[str, torch.Tensor]             # the converted program's state dict

    def plan_for(self, layer: str) -> SitePlan | None:
        return next((p for p in self.plans.values() if p.layer == layer), None)

    def module_for(self, site, env: dict) -> nn.Module:
        """A new module for the conversion's site at ``site.layer``, its saved weights loaded (the
        backend keeps it per set of model weights, so two compiled models never share one)."""
        plan = self.plan_for(site.layer)
        if plan is None:
            raise ValueError(f"{self.label} has no converted site at {site.layer} (it has "
                             f"{sorted(p.layer for p in self.plans.values())}): it is a conversion of another model")
        problem = plan_mismatch(plan, site, env)
        if problem:
            raise ValueError(f"{self.label} does not fit the attention at {site.layer} ({problem}): it is a "
                             "conversion of another model")
        module = site_module(site, plan, env[site.hidden])
        prefix = f"{MODULES}.{plan.index}."
        state = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{self.label}: the saved weights of {site.layer} do not fit its plan ({e})") from e
        return module

    def check_weights(self, gm: fx.GraphModule, names: list[str | None], example_inputs: list) -> None:
        """Every model weight the rewritten ``gm`` still reads equals the conversion's copy; ``names``
        (``weight_names``) and ``example_inputs`` follow ``gm``'s placeholders."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        checked, differ, missing = 0, [], []
        for node, source_name, x in zip(placeholders, names, example_inputs):
            if not node.users or source_name is None or not isinstance(x, torch.Tensor):
                continue
            name = _CAPTURED_PREFIX + source_name
            saved = self.tensors.get(name)
            if saved is None:
                missing.append(source_name)       # non-persistent buffers (RoPE tables) are not saved
                continue
            checked += 1
            if saved.shape != x.shape or not torch.equal(saved.to(device=x.device, dtype=x.dtype), x.detach()):
                differ.append(source_name)
        if differ:
            raise ValueError(f"the model's weights differ from {self.label}'s at {len(differ)} of {checked} tensors "
                             f"(e.g. {differ[:3]}): it is a conversion of another model, or a recovery that trained "
                             "weights outside the attention (DistillConfig.train='all' / 'latent+norms'); run that "
                             "one with mla_pass.load(DIR), or compile the model it was made from")
        logger.debug("%s: %d weights equal, %d not saved (%s)", self.label, checked, len(missing), missing[:3])


def plan_mismatch(plan: SitePlan, site, env: dict) -> str | None:
    """Why a plan cannot serve a matched site (shapes, layouts, scale), or None when it fits."""
    want = {"heads": (plan.n_heads, site.n_heads), "kv heads": (plan.n_kv_heads, site.n_kv_heads),
            "head dim": (plan.head_dim, site.head_dim), "value dim": (plan.value_dim, site.value_dim),
            "hidden": (plan.hidden, env[site.hidden].shape[-1]),
            "query layout": (plan.query_raw_layout, site.raw_layouts["query"]),
            "key layout": (plan.key_raw_layout, site.raw_layouts["key"]), "softcap": (plan.softcap, site.core.softcap),
            "key norm": (plan.key_norm, site.key_norm.group if site.key_norm else None),
            "rotated dims": (plan.rotated_dims, sorted(d for pair in site.rope.pairs for d in pair)),
            "kv head of each query head": (plan.kv_head_of_query, list(site.kv_head_of_query))}
    for what, (planned, found) in want.items():
        if planned != found:
            return f"{what}: planned {planned}, found {found}"
    if abs(plan.scale - site.scale) > 1e-6 * plan.scale:
        return f"scale: planned {plan.scale}, found {site.scale}"
    return None


# --------------------------------------------------------------------------------------------
# where conversions come from (each made once)
# --------------------------------------------------------------------------------------------
_CHECKPOINTS: dict[tuple, Conversion] = {}
_CALIBRATED: dict[tuple, Conversion] = {}


def from_checkpoint(path: str | os.PathLike) -> Conversion:
    """The conversion saved in ``path`` (read and verified once per folder and weights file)."""
    from ..persist import WEIGHTS_FILE, read_checkpoint

    path = Path(path).resolve()
    weights = path / WEIGHTS_FILE
    stamp = weights.stat().st_mtime_ns if weights.is_file() else None
    key = (str(path), stamp)
    if key not in _CHECKPOINTS:
        checkpoint = read_checkpoint(path)
        _CHECKPOINTS[key] = Conversion(f"checkpoint {path}", checkpoint.config, checkpoint.plans, checkpoint.tensors)
    return _CHECKPOINTS[key]


def from_calibration(model: nn.Module, config: MLAConfig, tokens: torch.Tensor) -> Conversion:
    """``convert(model, config, calibration=tokens)``, once per (model, config, tokens).

    It runs in a worker thread: torch.export inside a dynamo compile would otherwise change the
    thread-local state dynamo's guards were built under."""
    import concurrent.futures

    from ..pipeline import convert

    digest = hashlib.sha1(tokens.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    key = (id(model), config, tuple(tokens.shape), digest)
    entry = _CALIBRATED.get(key)
    if entry is None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            mla = pool.submit(convert, model, config, tokens, progress=False).result()
        entry = Conversion(f"the calibrated conversion of {type(model).__name__}", mla.config, mla.plans,
                           mla.program.state_dict())
        _CALIBRATED.clear()          # one model at a time: do not keep old models' weights alive
        _CALIBRATED[key] = entry
    return entry


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]")


def weight_names(gm: fx.GraphModule) -> list[str | None]:
    """Per placeholder of dynamo's graph, the model's own name of the weight it carries
    (``model.layers.0.mlp.up_proj.weight``), or None for data inputs."""
    names = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = source.name if source is not None else ""
        is_weight = "._parameters[" in name or "._buffers[" in name
        names.append(".".join(_SOURCE_PART.findall(name)) if is_weight else None)
    return names


def traced_model(gm: fx.GraphModule) -> nn.Module:
    """The ``nn.Module`` whose weights dynamo lifted into ``gm``: the traced frame's local that
    the weights' sources start from (``L['self']``, ``L['args'][0]``), read from the frame dynamo
    is compiling."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    roots = set()
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = source.name if source is not None else ""
        if "._parameters[" in name:
            roots.add(name.split("._modules[")[0].split("._parameters[")[0])
    tx = InstructionTranslator.current_tx() if hasattr(InstructionTranslator, "current_tx") else None
    if len(roots) != 1 or tx is None or not re.fullmatch(r"L\[[^\]]*\](?:\[\d+\])*", next(iter(roots))):
        raise ValueError("options={'calibration': ...} needs the model object, which this graph does not lead to "
                         f"(weights from {sorted(roots) or 'nowhere'}): convert it with mla_pass.convert(model, config, "
                         "calibration=ids), save it (mla.save(DIR)) and compile with options={'checkpoint': DIR}")
    model = eval(next(iter(roots)), {"__builtins__": {}}, {"L": tx.f_locals})   # dynamo's own source expression
    if not isinstance(model, nn.Module):
        raise ValueError(f"the traced frame's {next(iter(roots))} is a {type(model).__name__}, not the model")
    return model
