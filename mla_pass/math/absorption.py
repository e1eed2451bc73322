"""Absorbing the up-projections into the query and output projections (DeepSeek-V2 §2.1.2).

In the absorbed form a query head only meets the latent through ``q_nope_h · W_ukʲ`` and the
output only leaves it through ``W_o,h · W_uvʲ``. Both products are linear in the weights, so
they can be computed once:

    q_latent_h = scale · W_ukʲᵀ · (W_q,nope_h x + b_q,nope_h)      = A_h x + a_h          [C]
    q_rope_h   = scale · (W_q,rope_h x + b_q,rope_h)               (rotated afterwards)    [2r]
    y          = Σ_h W_o,h (W_uvʲ o_h + b_vʲ) + b_o                = Σ_h B_h o_h + b       [D]

where ``o_h = Σ_t a_t c_t`` is head h's latent output. The decode step then runs one [H·C]
projection instead of an [H·Dh] one, one [H·C] → D output projection instead of [H·Dv] → D,
and neither per-head up-projection: fewer weight bytes and fewer ops per layer while C is below
the head width (above it, applying W_uk / W_uv per head after the [H·Dh] projections reads less).

A prompt of S tokens is cheaper the other way round (every score costs H·(Dh + 2r) instead of
H·(C + 2r), and the decompression is paid once per key, not per query), so the exported program
also keeps the projections of the decompressed form, with the same folds (``nope_query``:
scale and the fitted map in W_q; ``decompressed_output``: b_v through W_o). Pure math: the
weights come in as tensors, ``lowering/absorb.py`` finds them in a program.
"""
from __future__ import annotations

import torch


def absorbed_query(w_query_HDX: torch.Tensor, b_query_HD: torch.Tensor | None, nope_dims_HN: torch.Tensor,
                   up_key_HkvNC: torch.Tensor, kv_head_of_query: torch.Tensor, scale: float,
                   nope_mix_HN2: torch.Tensor | None = None, nope_partner_HN: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(A [H·C, X], a [H·C] | None): the scaled latent query of every head from the hidden state.

    ``nope_mix_HN2`` / ``nope_partner_HN``: the fitted map for dropped rotary pairs
    (``LatentAttention.split_query``: q_nope ← mix₀·q_nope + mix₁·q_nope[partner])."""
    w_nope, b_nope = _nope_rows(w_query_HDX, b_query_HD, nope_dims_HN, nope_mix_HN2, nope_partner_HN)
    up = up_key_HkvNC.index_select(0, kv_head_of_query).to(w_nope.dtype)           # [H, N, C]
    w = scale * torch.einsum("hnc,hnx->hcx", up, w_nope)
    b = None if b_nope is None else scale * torch.einsum("hnc,hn->hc", up, b_nope)
    return w.reshape(-1, w.shape[-1]), (None if b is None else b.reshape(-1))


def nope_query(w_query_HDX: torch.Tensor, b_query_HD: torch.Tensor | None, nope_dims_HN: torch.Tensor, scale: float,
               nope_mix_HN2: torch.Tensor | None = None, nope_partner_HN: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [H·N, X], b [H·N] | None): the scaled unrotated query of every head, the fitted map for
    dropped pairs folded in: the decompressed form's q_nope, scored against W_uk·c."""
    w_nope, b_nope = _nope_rows(w_query_HDX, b_query_HD, nope_dims_HN, nope_mix_HN2, nope_partner_HN)
    return (scale * w_nope).reshape(-1, w_nope.shape[-1]), (None if b_nope is None else scale * b_nope.reshape(-1))


def _nope_rows(w_query_HDX, b_query_HD, nope_dims_HN, nope_mix_HN2, nope_partner_HN):
    """The nope dims' rows of the query map [H, N, X] (and bias [H, N]), the fitted map applied."""
    idx = nope_dims_HN[:, :, None].expand(-1, -1, w_query_HDX.shape[-1])
    w_nope = w_query_HDX.gather(1, idx)                                              # [H, N, X]
    b_nope = None if b_query_HD is None else b_query_HD.gather(1, nope_dims_HN)      # [H, N]
    if nope_mix_HN2 is not None:
        partner = nope_partner_HN[:, :, None].expand_as(w_nope)
        w_nope = w_nope * nope_mix_HN2[..., :1] + w_nope.gather(1, partner) * nope_mix_HN2[..., 1:]
        if b_nope is not None:
            b_nope = b_nope * nope_mix_HN2[..., 0] + b_nope.gather(1, nope_partner_HN) * nope_mix_HN2[..., 1]
    return w_nope, b_nope


def rope_query(w_query_HDX: torch.Tensor, b_query_HD: torch.Tensor | None, rope_dims_HR: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [H·2r, X], b [H·2r] | None): the scaled rotated dims of every query head, before RoPE
    (a scalar commutes with the rotation)."""
    idx = rope_dims_HR[:, :, None].expand(-1, -1, w_query_HDX.shape[-1])
    w = scale * w_query_HDX.gather(1, idx)
    b = None if b_query_HD is None else scale * b_query_HD.gather(1, rope_dims_HR)
    return w.reshape(-1, w.shape[-1]), (None if b is None else b.reshape(-1))


def absorbed_output(w_out_YHV: torch.Tensor, b_out_Y: torch.Tensor | None, up_value_HkvVC: torch.Tensor,
                    b_value_HkvV: torch.Tensor | None, kv_head_of_query: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B [Y, H·C], b [Y] | None): the output projection applied to the heads' latent outputs.

    ``w_out_YHV`` is the affine map from the attention output [H, V] of one token to the
    projected y [Y]. The value bias passes through unchanged (attention weights sum to 1)."""
    up = up_value_HkvVC.index_select(0, kv_head_of_query).to(w_out_YHV.dtype)       # [H, V, C]
    w = torch.einsum("yhv,hvc->yhc", w_out_YHV, up)
    return w.reshape(w.shape[0], -1), decompressed_output(w_out_YHV, b_out_Y, b_value_HkvV, kv_head_of_query)[1]


def decompressed_output(w_out_YHV: torch.Tensor, b_out_Y: torch.Tensor | None, b_value_HkvV: torch.Tensor | None,
                        kv_head_of_query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [Y, H·V], b [Y] | None): the output projection of the heads' value outputs, with the
    value bias folded into its bias (attention weights sum to 1, so b_v passes through)."""
    b = b_out_Y
    if b_value_HkvV is not None:
        b_value_HV = b_value_HkvV.index_select(0, kv_head_of_query).to(w_out_YHV.dtype)
        through = torch.einsum("yhv,hv->y", w_out_YHV, b_value_HV)
        b = through if b is None else b + through
    return w_out_YHV.reshape(w_out_YHV.shape[0], -1), b
