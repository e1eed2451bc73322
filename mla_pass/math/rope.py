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
    by_speed = sorted(range(n_pairs), key=lambda k: -speeds[k])          # fastest first
    if strategy == "high":
        chosen = by_speed[:keep]
    elif strategy == "low":
        chosen = by_speed[n_pairs - keep:]
    elif strategy == "uniform":
        chosen = [by_speed[round(i * (n_pairs - 1) / max(keep - 1, 1))] for i in range(keep)] if keep else []
        chosen = list(dict.fromkeys(chosen))
    elif strategy == "2-norm":
        if scores_HkvP is None:
            raise ValueError("rope_strategy='2-norm' needs calibration statistics")
        return [sorted(torch.topk(scores_HkvP[j], keep).indices.tolist()) if keep else []
                for j in range(n_kv_heads)]
    else:
        raise ValueError(f"unknown rope strategy {strategy!r}")
    return [sorted(chosen) for _ in range(n_kv_heads)]
