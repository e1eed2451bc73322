"""Low-rank factorisation of the non-RoPE key and the value projections.

Joint: W = [W_k_nope ; W_v] (all kv heads stacked) ≈ U_c Σ_c V_cᵀ; the down-projection is
V_cᵀ (c × D) and the up-projections are the row blocks of U_c Σ_c. At c = rank the product is
W exactly (up to float64 SVD round-off). Biases stay on the up side, untouched (exact).

Activation-aware (given the mean Gram matrix G = E[x xᵀ] of the projections' input): minimise
‖(W − Ŵ)X‖ instead. With G + λI = LLᵀ, take the SVD of W·L; then down = V_cᵀL⁻¹, up = U_cΣ_c.
At full rank up·down = W·L·L⁻¹ = W, still exact.

Least-squares refit (given G and a fixed down-projection D): the up-projection minimising
E‖U·D·x − W·x‖² + ρ‖U‖² is U = W·G·Dᵀ·(D·G·Dᵀ + ρI)⁻¹ (the normal equations).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankKV:
    down: torch.Tensor        # [C, D]
    up_key: torch.Tensor      # [Hkv, Dn, C]
    up_value: torch.Tensor    # [Hkv, Dv, C]


def full_latent_dim(rows_key: int, rows_value: int, hidden: int, mode: str) -> int:
    """The latent width at which the factorisation is exact."""
    if mode == "joint":
        return min(rows_key + rows_value, hidden)
    return min(rows_key, hidden) + min(rows_value, hidden)


def factorize_kv(w_key_nope: torch.Tensor, w_value: torch.Tensor, latent_dim: int, mode: str = "joint",
                 gram: torch.Tensor | None = None, damping: float = 1e-2, key_rank: int | None = None) -> LowRankKV:
    """w_key_nope [Hkv, Dn, D], w_value [Hkv, Dv, D] → LowRankKV with latent width ``latent_dim``
    (activation-aware when ``gram`` [D, D] is given). ``key_rank``: the rank bound of the key rows
    (default their count; less where kept rope slots were projected out), which sizes ``split``'s
    key half."""
    n_kv, dn, hidden = w_key_nope.shape
    dv = w_value.shape[1]
    out_dtype = w_value.dtype
    wk = w_key_nope.reshape(n_kv * dn, hidden).double()
    wv = w_value.reshape(n_kv * dv, hidden).double()
    chol = None if gram is None else _whitening(gram.double(), damping)
    if mode == "joint":
        down, up = _truncated(torch.cat([wk, wv]), latent_dim, chol)
        up_k, up_v = up[: n_kv * dn], up[n_kv * dn:]
    elif mode == "split":
        ck = split_key_width(wk.shape[0] if key_rank is None else key_rank, hidden, latent_dim)
        cv = latent_dim - ck
        down_k, up_k_part = _truncated(wk, ck, chol)
        down_v, up_v_part = _truncated(wv, cv, chol)
        down = torch.cat([down_k, down_v])
        up_k = torch.cat([up_k_part, up_k_part.new_zeros(up_k_part.shape[0], cv)], dim=1)
        up_v = torch.cat([up_v_part.new_zeros(up_v_part.shape[0], ck), up_v_part], dim=1)
    else:
        raise ValueError(f"unknown svd mode {mode!r}")
    return LowRankKV(down=down.to(out_dtype),
                     up_key=up_k.reshape(n_kv, dn, latent_dim).to(out_dtype),
                     up_value=up_v.reshape(n_kv, dv, latent_dim).to(out_dtype))


def split_key_width(rows_key: int, hidden: int, latent_dim: int) -> int:
    """In ``split`` mode, how many latent values the keys get (the first ones; values get the rest)."""
    return min(latent_dim // 2 + latent_dim % 2, min(rows_key, hidden)) if rows_key else 0


def _whitening(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower-triangular L with LLᵀ = G + λ·mean(diag G)·I (λ keeps it invertible)."""
    ridge = damping * gram.diagonal().mean().clamp(min=1e-12)
    return torch.linalg.cholesky(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def _truncated(w: torch.Tensor, rank: int, chol: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [rank, D], up [rows, rank]): up @ down is the best rank-``rank`` approximation of w,
    in the plain norm, or in ‖(w − ŵ)L‖ when ``chol`` = L is given."""
    rows, hidden = w.shape
    if rank > min(rows, hidden):
        raise ValueError(f"rank {rank} exceeds the matrix's full rank {min(rows, hidden)}")
    if rows == 0 or rank == 0:
        return w.new_zeros(rank, hidden), w.new_zeros(rows, rank)
    if chol is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return vh[:rank], u[:, :rank] * s[:rank]
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    # down = V_cᵀ L⁻¹, i.e. solve down·L = V_cᵀ
    down = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)
    return down, u[:, :rank] * s[:rank]


def refit_up(w_key_nope: torch.Tensor, w_value: torch.Tensor, down: torch.Tensor, gram: torch.Tensor,
             ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Up-projections (up_key [Hkv, Dn, C], up_value [Hkv, Dv, C]) that best reproduce the
    original keys and values from the latent D·x on activations with mean Gram ``gram`` [D, D]
    (ridge ``ridge`` × the mean diagonal of D·G·Dᵀ)."""
    n_kv, dn, hidden = w_key_nope.shape
    dv = w_value.shape[1]
    w = torch.cat([w_key_nope.reshape(n_kv * dn, hidden), w_value.reshape(n_kv * dv, hidden)]).double()
    d, g = down.double(), gram.double()
    if d.shape[0] == 0:
        return w_key_nope.new_zeros(n_kv, dn, 0), w_value.new_zeros(n_kv, dv, 0)
    gd = g @ d.T                                                          # [D, C]
    lhs = d @ gd                                                          # [C, C]
    lhs = lhs + ridge * lhs.diagonal().mean().clamp(min=1e-12) * torch.eye(lhs.shape[0], dtype=lhs.dtype)
    up = torch.linalg.solve(lhs, (w @ gd).T).T                            # W·G·Dᵀ·(D·G·Dᵀ + ρI)⁻¹ (lhs symmetric)
    c = d.shape[0]
    return (up[: n_kv * dn].reshape(n_kv, dn, c).to(w_key_nope.dtype),
            up[n_kv * dn:].reshape(n_kv, dv, c).to(w_value.dtype))
