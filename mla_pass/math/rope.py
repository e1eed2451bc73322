"""Partial RoPE: which rotary frequency pairs stay rotated, per kv head."""
from __future__ import annotations

import torch


def pair_norms(t_BHSD: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Sum over tokens of ‖t_h^(k)‖ (the 2-dim pair's norm) → [H, P]; divide by the token count."""
    if not pairs:
        return t_BHSD.new_zeros(t_BHSD.shape[1], 0, dtype=torch.float64)
    idx = torch.tensor(pairs, device=t_BHSD.device)                      # [P, 2]
    pair_vals = t_BHSD.double()[..., idx]                                # [B, H, S, P, 2]
    return pair_vals.norm(dim=-1).sum(dim=(0, 2))                        # [H, P]


def two_norm_scores(query_norms_HP: torch.Tensor, key_norms_HkvP: torch.Tensor,
                    kv_head_of_query: tuple[int, ...]) -> torch.Tensor:
    """MHA2MLA's 2-norm score per kv head j and pair k: Σ_{h in group j} ‖q_h^(k)‖·‖k_j^(k)‖."""
    n_kv = key_norms_HkvP.shape[0]
    scores = torch.zeros_like(key_norms_HkvP)
    for h, j in enumerate(kv_head_of_query):
        scores[j] += query_norms_HP[h] * key_norms_HkvP[j]
    assert scores.shape[0] == n_kv
    return scores


def select_pairs(strategy: str, speeds: list[float], keep: int, n_kv_heads: int,
                 scores_HkvP: torch.Tensor | None = None) -> list[list[int]]:
    """Indices (into the site's pair list) of the pairs kept rotated, for each kv head."""
    n_pairs = len(speeds)
    if keep > n_pairs:
        raise ValueError(f"cannot keep {keep} rotary pairs: the model rotates only {n_pairs}")
    if keep == n_pairs:                                                  # all kept: nothing to rank
        return [list(range(n_pairs)) for _ in range(n_kv_heads)]
    by_speed = sorted(range(n_pairs), key=lambda k: -speeds[k])          # fastest first
    if strategy == "high":
        chosen = by_speed[:keep]
    elif strategy == "low":
        chosen = by_speed[n_pairs - keep:]
    elif strategy == "uniform":
        chosen = [by_speed[round(i * (n_pairs - 1) / max(keep - 1, 1))] for i in range(keep)] if keep else []
        chosen = list(dict.fromkeys(chosen))
    elif strategy in ("2-norm", "score-error"):
        if scores_HkvP is None:
            raise ValueError(f"rope_strategy={strategy!r} needs calibration statistics")
        return [sorted(torch.topk(scores_HkvP[j], keep).indices.tolist()) if keep else []
                for j in range(n_kv_heads)]
    else:
        raise ValueError(f"unknown rope strategy {strategy!r}")
    return [sorted(chosen) for _ in range(n_kv_heads)]


def pair_score_errors(q_raw_BHSD: torch.Tensor, q_rot_BHSD: torch.Tensor, k_raw_BHkvSD: torch.Tensor,
                      k_rot_BHkvSD: torch.Tensor, pairs: list[tuple[int, int]],
                      kv_head_of_query: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """What each rotary pair's rotation contributes to the attention scores, over causal token pairs.

    For query head h, pair p, query position m and key position n ≤ m, the score term of p is
    q_p[m]·k_p[n]; dropping p's rotation replaces the rotated vectors with the raw ones. Returns
    sums over sequences and causal (m, n), summed over the query heads of each kv head group:
    - error [Hkv, P]: Σ (q_rot_p[m]·k_rot_p[n] − q_raw_p[m]·k_raw_p[n])²
    - energy [Hkv, P]: Σ (q_rot_p[m]·k_rot_p[n])²
    Divide by the number of causal pairs per head, B·S(S+1)/2. Exact and O(S): with
    a_m = [q_rot; q_raw] and b_n = [k_rot; −k_raw] (4 values each), the term is (a_m·b_n)² =
    a_mᵀ (b_n b_nᵀ) a_m, and Σ_{n≤m} b_n b_nᵀ is a running sum. The model's own rotated tensors
    are used, so the result does not depend on its rotation's sign convention.
    """
    n_kv = k_raw_BHkvSD.shape[1]
    if not pairs:
        z = torch.zeros(n_kv, 0, dtype=torch.float64, device=k_raw_BHkvSD.device)
        return z, z.clone()
    idx = torch.tensor(pairs, device=q_raw_BHSD.device)                                    # [P, 2]
    take = lambda t: t.detach().double()[..., idx]                                         # noqa: E731  [B,H,S,P,2]
    a = torch.cat([take(q_rot_BHSD), take(q_raw_BHSD)], dim=-1)                            # [B,H,S,P,4]
    b = torch.cat([take(k_rot_BHkvSD), -take(k_raw_BHkvSD)], dim=-1)                       # [B,Hkv,S,P,4]
    running = (b[..., :, None] * b[..., None, :]).cumsum(dim=2)                            # [B,Hkv,S,P,4,4]
    error = torch.zeros(n_kv, len(pairs), dtype=torch.float64, device=a.device)
    energy = torch.zeros_like(error)
    for h, j in enumerate(kv_head_of_query):
        error[j] += torch.einsum("bspi,bspij,bspj->p", a[:, h], running[:, j], a[:, h])
        energy[j] += torch.einsum("bspi,bspij,bspj->p", a[:, h, ..., :2], running[:, j, ..., :2, :2],
                                  a[:, h, ..., :2])
    return error, energy


def causal_pairs(batch: int, seq: int) -> int:
    """Number of (query, key) token pairs with key ≤ query, per head, over a batch."""
    return batch * seq * (seq + 1) // 2
