"""Fill a latent attention module's weights from its site's pretrained K/V projections (SVD, optional refit)."""
from __future__ import annotations

import torch

from ..frontend.match import AttentionSite
from ..math.rope import split_key_weights
from ..math.svd import factorize_kv, refit_up, split_key_width
from ..modules.latent_attention import LatentAttention


@torch.no_grad()
def initialise(module: LatentAttention, site: AttentionSite, gram: torch.Tensor | None = None,
               damping: float = 1e-2, activation_aware: bool = True, refit: bool = False,
               nope_maps: torch.Tensor | None = None, rope_mix: torch.Tensor | None = None) -> None:
    """Fill a module's weights from the site's pretrained K/V projections: SVD (activation-aware
    when ``gram``, the mean x·xᵀ of the projections' input, is given and ``activation_aware``),
    then optionally a least-squares refit of the up-projections on ``gram``; ``nope_maps``
    [H, P, 2, 2] (from ``plan.choose.nope_maps``) fill the query map of the dropped pairs;
    ``rope_mix`` [P, Hkv, Hkv] (``plan.choose.rope_mixing``; default the identity) mixes each rotary
    pair across kv heads: the kept slots' rows become the rope key, the rest stays in the latent."""
    p, w = module.plan, site.weights
    if rope_mix is None:
        rope_mix = torch.eye(p.n_kv_heads, dtype=torch.float64).repeat(len(p.rope_pairs), 1, 1)
    b_key = None if w.b_key is None else w.b_key.double()
    w_key_nope, b_key_nope, w_rope, b_rope = split_key_weights(w.w_key.double(), b_key, p.rope_pairs, rope_mix,
                                                               p.rope_slots)
    w_key_nope = w_key_nope.to(w.w_key.dtype)                      # [Hkv, Dh, D]
    key_rank = p.n_kv_heads * p.head_dim - p.rope_width        # the kept slots' rows are projected out
    low = factorize_kv(w_key_nope, w.w_value, p.latent_dim, p.svd, gram=gram if activation_aware else None,
                       damping=damping, key_rank=key_rank)
    if refit:
        if gram is None:
            raise ValueError("refit needs the activation Gram matrix from calibration")
        if p.svd == "joint":
            low.up_key, low.up_value = refit_up(w_key_nope, w.w_value, low.down, gram)
        else:                   # split: keys read only the first c_k latent values, values the rest
            c_k = split_key_width(key_rank, p.hidden, p.latent_dim)
            none_v, none_k = w.w_value[:, :0], w_key_nope[:, :0]
            low.up_key[..., :c_k] = refit_up(w_key_nope, none_v, low.down[:c_k], gram)[0]
            low.up_value[..., c_k:] = refit_up(none_k, w.w_value, low.down[c_k:], gram)[1]
    module.down.copy_(low.down)
    module.up_key.copy_(low.up_key)
    module.up_value.copy_(low.up_value)
    if module.key_bias is not None:
        module.key_bias.copy_(b_key_nope)
    if module.value_bias is not None:
        module.value_bias.copy_(w.b_value)
    if p.key_norm:
        norm = site.key_norm_weights
        module.key_norm_weight.copy_(norm.full_weight.reshape(-1, p.hidden))
        if module.key_norm_bias is not None:
            module.key_norm_bias.copy_(norm.full_bias.reshape(-1))
    if module.query_nope_mix is not None:
        if nope_maps is None:
            raise ValueError(f"{p.layer}: the plan fits the dropped rotary pairs (nope_fit) but no fit was given")
        _fill_query_nope_mix(module, nope_maps)
    module.rope_mix.copy_(rope_mix)
    if module.rope_key is not None:
        module.rope_key.weight.copy_(w_rope)
        if module.rope_key.bias is not None:
            module.rope_key.bias.copy_(b_rope)
        kv = torch.tensor(p.kv_head_of_query)
        coef = torch.stack([rope_mix[k][kv, j] for k, j in p.rope_slots], dim=1)           # [H, S]: U_k[g(h), j]
        module.rope_query_mix.copy_(coef.repeat_interleave(2, dim=1))


def _fill_query_nope_mix(module: LatentAttention, maps_HP22: torch.Tensor) -> None:
    """q' = Mᵀq on each dropped pair (d0, d1): q'0 = M00·q0 + M10·q1, q'1 = M11·q1 + M01·q0, written
    as (self, partner) coefficients at the pair's positions among each query head's nope dims."""
    mix = torch.zeros_like(module.query_nope_mix, dtype=torch.float64)
    mix[..., 0] = 1.0
    for h, k, i0, i1 in module.dropped_pair_positions():
        m = maps_HP22[h, k].double()
        mix[h, i0] = torch.stack([m[0, 0], m[1, 0]])
        mix[h, i1] = torch.stack([m[1, 1], m[0, 1]])
    module.query_nope_mix.copy_(mix)
