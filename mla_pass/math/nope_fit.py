"""What replaces the rotation of a dropped rotary pair: a fitted 2×2 map on the query.

For query head h, rotary pair p (dims (d0, d1) of the site's pair list), query position m and key
position n ≤ m, the pair's term of the attention score is s = q_rot·k_rot (the model's rotated
vectors). Partial RoPE drops the rotation; MHA2MLA then scores q·k (raw vectors), which for a fast
pair is far from s: over many relative positions s averages to ~0. A fixed substitute qᵀMk with a
2×2 map M per query head and pair folds into the query (q' = Mᵀq; M = I is today's replacement,
exact when nothing is dropped). It is fitted by least squares, s ≈ Σ_uv M_uv·g_uv with
g_uv = q_u·k_v, over the causal token pairs of calibration text, optionally weighted by the
original attention probabilities (the error that matters is where attention looks). Forms:
``"rotation"``: M = a·I + b·J (J = [[0, −1], [1, 0]]), an averaged rotation, what a uniform spread
of phases gives; ``"general"``: any 2×2 M (q and k are not isotropic within a pair).

Statistics: the 5×5 moments Σ w F Fᵀ of F = [s, g00, g01, g10, g11] per (h, p). Each feature is
bilinear in y(n) = [k_rot; k] (4 values): F = X(m)ᵀ y(n) with a 4×5 matrix X(m) made of q_rot and
q, so Σ_n w_mn F Fᵀ = X(m)ᵀ (Σ_n w_mn y(n) y(n)ᵀ) X(m): with uniform causal weights the inner sum
is a running sum (O(S)); with attention weights one batched matmul P @ (y yᵀ) (O(S²)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHTINGS = ("uniform", "attention", "attention-centered")


def pair_fit_moments(q_raw_BHSD: torch.Tensor, q_rot_BHSD: torch.Tensor, k_raw_BHkvSD: torch.Tensor,
                     k_rot_BHkvSD: torch.Tensor, pairs: list[tuple[int, int]], kv_head_of_query: tuple[int, ...],
                     weighting: str = "uniform", scale: float | None = None,
                     softcap: float | None = None) -> tuple[torch.Tensor, float]:
    """Σ w_mn F Fᵀ over token pairs, per query head and pair → ([H, P, 5, 5] float64, Σ w_mn per head).

    ``weighting="uniform"``: w_mn = 1 for n ≤ m (Σ w = B·S(S+1)/2). ``"attention"``: w_mn is the
    original causal attention probability of query head h (softmax of scale·q_rot·k_rot over the
    whole head, with ``softcap`` if the model caps scores; Σ w = B·S); ``scale`` is then required.
    ``"attention-centered"``: the same weights, with each query's attention-weighted mean of F
    removed (Σ_m Σ_n P_mn (F − μ_m)(F − μ_m)ᵀ): softmax ignores a score error that is the same for
    every key, and ½·Σ_n P_mn (e_mn − ē_m)² is the KL of a query's attention row to second order.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    b, n_heads, s, _ = q_rot_BHSD.shape
    count = float(b * s * (s + 1) // 2) if weighting == "uniform" else float(b * s)
    if weighting != "uniform" and scale is None:
        raise ValueError(f"weighting={weighting!r} needs the site's score scale")
    if not pairs:
        return torch.zeros(n_heads, 0, 5, 5, dtype=torch.float64, device=q_rot_BHSD.device), count
    idx = torch.tensor(pairs, device=q_rot_BHSD.device)                                  # [P, 2]
    take = lambda t: t.detach().double()[..., idx]                                       # noqa: E731  [B,H,S,P,2]
    q_raw, q_rot = take(q_raw_BHSD), take(q_rot_BHSD)
    x = q_rot.new_zeros(*q_rot.shape[:-1], 4, 5)                                         # [B,H,S,P,4,5]
    x[..., :2, 0] = q_rot                                       # s = q_rot·k_rot
    for u in range(2):
        for v in range(2):
            x[..., 2 + v, 1 + 2 * u + v] = q_raw[..., u]        # g_uv = q_u·k_v
    y = torch.cat([take(k_rot_BHkvSD), take(k_raw_BHkvSD)], dim=-1)                      # [B,Hkv,S,P,4]
    outer = y[..., :, None] * y[..., None, :]                                            # [B,Hkv,S,P,4,4]
    moments = torch.zeros(n_heads, len(pairs), 5, 5, dtype=torch.float64, device=y.device)
    if weighting == "uniform":
        running = outer.cumsum(dim=2)
    else:
        probs = _attention_probs(q_rot_BHSD, k_rot_BHkvSD, kv_head_of_query, scale, softcap)   # [B,H,S,S]
    for h, j in enumerate(kv_head_of_query):
        if weighting == "uniform":
            inner = running[:, j]
        else:     # Σ_n P_mn y yᵀ: one matmul over the key axis (float64: centering subtracts near-equal sums)
            inner = (probs[:, h] @ outer[:, j].reshape(b, s, -1)).reshape(outer[:, j].shape)
        moments[h] = torch.einsum("nspai,nspaj->pij", x[:, h], inner @ x[:, h])
        if weighting == "attention-centered":     # minus Σ_m μ(m) μ(m)ᵀ, μ(m) = Σ_n P_mn F(m, n)
            mean_y = (probs[:, h] @ y[:, j].reshape(b, s, -1)).reshape(y[:, j].shape)
            mu = torch.einsum("nspa,nspai->nspi", mean_y, x[:, h])
            moments[h] -= torch.einsum("nspi,nspj->pij", mu, mu)
    return moments, count


def _attention_probs(q_rot_BHSD, k_rot_BHkvSD, kv_head_of_query, scale: float, softcap: float | None):
    k = k_rot_BHkvSD.detach().double()[:, list(kv_head_of_query)]                       # [B,H,S,D]
    scores = (q_rot_BHSD.detach().double() @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    s = scores.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


FORMS = ("rotation", "general")
_IDENTITY = (1.0, 0.0, 0.0, 1.0)          # vec(M) = (M00, M01, M10, M11) of M = I


@dataclass
class NopeFit:
    """Per query head and pair: the fitted map and what each replacement leaves (weighted means or
    sums, as the moments were)."""
    maps: torch.Tensor             # [H, P, 2, 2]: M, the dropped pair scores qᵀMk
    fitted_error: torch.Tensor     # [H, P]: Σ w (s − qᵀMk)²
    identity_error: torch.Tensor   # [H, P]: Σ w (s − q·k)², the error of M = I (no fit)
    energy: torch.Tensor           # [H, P]: Σ w s²


def fit_maps(moments_HP55: torch.Tensor, form: str = "rotation", ridge: float = 1e-6) -> NopeFit:
    """Least-squares M from the moments (sums or means, the fit is the same): vec(M) = B·θ with
    B = I (``"general"``) or B = [[1, 0], [0, −1], [0, 1], [1, 0]] (``"rotation"``, θ = (a, b));
    normal equations (BᵀGB + λI)·θ = Bᵀr with G = Σ g gᵀ, r = Σ s·g, and λ = ``ridge`` × the mean
    of BᵀGB's diagonal (a pair whose q or k is ~0 gets M ≈ 0: it scores ~0 either way)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    m = moments_HP55.double()
    gram, rhs, energy = m[..., 1:, 1:], m[..., 1:, 0], m[..., 0, 0]             # [H,P,4,4], [H,P,4], [H,P]
    basis = torch.eye(4, dtype=m.dtype, device=m.device) if form == "general" else \
        torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 1.0], [1.0, 0.0]], dtype=m.dtype, device=m.device)
    lhs = basis.T @ gram @ basis
    lam = ridge * lhs.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)
    eye = torch.eye(basis.shape[1], dtype=m.dtype, device=m.device)
    theta = torch.linalg.solve(lhs + lam[..., None, None] * eye, (rhs @ basis)[..., None])[..., 0]
    vec = theta @ basis.T                                                           # [H, P, 4]
    identity = torch.tensor(_IDENTITY, dtype=m.dtype, device=m.device).expand_as(vec)
    return NopeFit(maps=vec.reshape(*vec.shape[:-1], 2, 2), fitted_error=_error(energy, rhs, gram, vec),
                   identity_error=_error(energy, rhs, gram, identity), energy=energy)


def _error(energy, rhs, gram, vec):
    """Σ w (s − vec·g)² = Σws² − 2 vec·r + vecᵀ G vec (clamped: round-off can dip below 0)."""
    return (energy - 2 * (vec * rhs).sum(-1) + torch.einsum("hpi,hpij,hpj->hp", vec, gram, vec)).clamp(min=0)


def group_sum(t_HP: torch.Tensor, kv_head_of_query: tuple[int, ...], n_kv_heads: int) -> torch.Tensor:
    """[H, P] → [Hkv, P]: summed over the query heads of each kv head's group."""
    out = t_HP.new_zeros(n_kv_heads, t_HP.shape[1])
    out.index_add_(0, torch.tensor(list(kv_head_of_query), device=t_HP.device), t_HP)
    return out


def apply_to_query(q_BHSD: torch.Tensor, maps_HP22: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """q' = Mᵀq on every pair of ``pairs``: q'_v = Σ_u M_uv·q_u (reference form, for tests)."""
    out = q_BHSD.clone()
    m = maps_HP22.to(q_BHSD.dtype)[None, :, None]                                  # [1, H, 1, P, 2, 2]
    for p, (d0, d1) in enumerate(pairs):
        q0, q1 = q_BHSD[..., d0], q_BHSD[..., d1]
        out[..., d0] = m[..., p, 0, 0] * q0 + m[..., p, 1, 0] * q1
        out[..., d1] = m[..., p, 0, 1] * q0 + m[..., p, 1, 1] * q1
    return out
