"""Partial RoPE: which rotary frequency pairs stay rotated (per kv head, or as slots shared by every head)."""
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


# -- shared rope slots: each frequency's pairs mixed across kv heads ------------------------------
#
# RoPE turns pair k of every kv head by the same angle, so an orthogonal U_k [Hkv, Hkv] applied
# across heads (the same on both dims of the pair) commutes with it: with k'^(k) = U_kᵀ k^(k),
# q_h^(k)·R·k_{g(h)}^(k) = Σ_j U_k[g(h), j] · q_h^(k)·R·k'_j^(k). A slot (k, j) is one mixed
# component; the kept slots' rotated keys are cached once for all query heads, the dropped ones
# join the unrotated (latent) part. U = I with r slots per kv head is MHA2MLA's partial RoPE.

def key_mix_moments(k_raw_BHkvSD: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Σ over tokens and the pair's two dims of k_g^(k)·k_g'^(k) → [P, Hkv, Hkv] float64."""
    if not pairs:
        return k_raw_BHkvSD.new_zeros(0, k_raw_BHkvSD.shape[1], k_raw_BHkvSD.shape[1], dtype=torch.float64)
    idx = torch.tensor(pairs, device=k_raw_BHkvSD.device)
    k = k_raw_BHkvSD.detach().double()[..., idx]                                          # [B,Hkv,S,P,2]
    return torch.einsum("bgspd,bGspd->pgG", k, k)


def mixing_matrices(moments_PHH: torch.Tensor) -> torch.Tensor:
    """U_k per pair [P, Hkv, Hkv]: the eigenvectors (columns) of each pair's key second moment,
    largest first, each signed so its largest entry is positive (a deterministic choice)."""
    if moments_PHH.shape[0] == 0:
        return moments_PHH.clone()
    _, vecs = torch.linalg.eigh(moments_PHH.double())
    vecs = vecs.flip(-1)                                                                    # largest first
    pick = vecs.abs().argmax(dim=1, keepdim=True)                                           # [P, 1, Hkv]
    return vecs * torch.sign(vecs.gather(1, pick))


def slot_score_moments(q_raw_BHSD: torch.Tensor, q_rot_BHSD: torch.Tensor, k_raw_BHkvSD: torch.Tensor,
                       k_rot_BHkvSD: torch.Tensor, pairs: list[tuple[int, int]]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The moments that give every slot's score error for any mixing U (``slot_errors``), summed
    over sequences and causal token pairs (m, n ≤ m), per query head h, pair k and kv heads g, g':
    - error [H, P, Hkv, Hkv]: Σ a_mᵀ (Σ_n b_g(n) b_g'(n)ᵀ) a_m with a = [q_rot; q_raw],
      b_g = [k_rot_g; −k_raw_g] (4 values each): the (rotated − unrotated) score of a mixed key
      Σ_g u_g k_g is a·Σ_g u_g b_g, so its squared sum is uᵀ E u;
    - energy [H, P, Hkv, Hkv]: the same with the rotated halves only (the score it carries).
    With U = I the diagonal summed over each group is ``pair_score_errors``. O(S) by running sums."""
    n_heads, n_kv = q_rot_BHSD.shape[1], k_raw_BHkvSD.shape[1]
    if not pairs:
        z = torch.zeros(n_heads, 0, n_kv, n_kv, dtype=torch.float64, device=k_raw_BHkvSD.device)
        return z, z.clone()
    idx = torch.tensor(pairs, device=q_raw_BHSD.device)
    take = lambda t: t.detach().double()[..., idx]                                         # noqa: E731  [B,·,S,P,2]
    a = torch.cat([take(q_rot_BHSD), take(q_raw_BHSD)], dim=-1)                            # [B,H,S,P,4]
    b = torch.cat([take(k_rot_BHkvSD), -take(k_raw_BHkvSD)], dim=-1)                       # [B,Hkv,S,P,4]
    error = torch.zeros(n_heads, len(pairs), n_kv, n_kv, dtype=torch.float64, device=a.device)
    energy = torch.zeros_like(error)
    for g in range(n_kv):          # one kv head at a time bounds the running sums' memory
        running = (b[:, g, None, :, :, :, None] * b[..., None, :]).cumsum(dim=2)          # [B,Hkv,S,P,4,4]
        error[:, :, g] = torch.einsum("bhspi,bGspij,bhspj->hpG", a, running, a)
        energy[:, :, g] = torch.einsum("bhspi,bGspij,bhspj->hpG", a[..., :2], running[..., :2, :2], a[..., :2])
    return error, energy


def slot_errors(moments_HPGG: torch.Tensor, mix_PGG: torch.Tensor, kv_head_of_query) -> torch.Tensor:
    """[P, Hkv]: for slot (k, j) = component j of pair k under ``mix`` (U_k, columns), Σ over
    query heads h of U_k[g(h), j]² · u_jᵀ E[h, k] u_j (``slot_score_moments``)."""
    kv = torch.as_tensor(list(kv_head_of_query), device=mix_PGG.device)
    per_head = torch.einsum("pgj,hpgG,pGj->hpj", mix_PGG, moments_HPGG, mix_PGG)           # [H, P, Hkv]
    weight = mix_PGG[:, kv, :].pow(2).permute(1, 0, 2)                                      # [H, P, Hkv]
    return (weight * per_head).sum(0)


def split_key_weights(w_key_HkvDX: torch.Tensor, b_key_HkvD: torch.Tensor | None, pairs: list[tuple[int, int]],
                      mix_PGG: torch.Tensor, slots: list[tuple[int, int]]):
    """The key projection split between kept slots and the rest, under mixing ``mix``:
    (w_nope [Hkv, D, X], b_nope, w_rope [2S, X], b_rope). Slot (k, j)'s two rows are component j
    of pair k's mixed rows (U_kᵀ W^(k)); the nope rows are each pair's rows with the kept
    components projected out (Σ over dropped j of U_k[:, j] U_k[:, j]ᵀ W^(k)); dims no pair
    covers stay as they are. Exact: w_nope's pair rows plus the kept slots mixed back give W."""
    w_nope = w_key_HkvDX.clone()
    b_nope = None if b_key_HkvD is None else b_key_HkvD.clone()
    kept: dict[int, list[int]] = {}
    for k, j in slots:
        kept.setdefault(k, []).append(j)
    rows_w, rows_b = [], []
    for k, (d0, d1) in enumerate(pairs):
        u = mix_PGG[k].to(w_key_HkvDX.dtype)                                               # [Hkv, Hkv]
        dims = [d0, d1]
        mixed = torch.einsum("gj,gdx->jdx", u, w_key_HkvDX[:, dims])                        # [Hkv, 2, X]
        mixed_b = None if b_key_HkvD is None else torch.einsum("gj,gd->jd", u, b_key_HkvD[:, dims])
        keep = kept.get(k, [])
        drop = torch.ones(u.shape[1], dtype=torch.bool)
        drop[keep] = False
        w_nope[:, dims] = torch.einsum("gj,jdx->gdx", u[:, drop], mixed[drop])
        if b_nope is not None:
            b_nope[:, dims] = torch.einsum("gj,jd->gd", u[:, drop], mixed_b[drop])
    for k, j in slots:
        d0, d1 = pairs[k]
        u = mix_PGG[k].to(w_key_HkvDX.dtype)
        rows_w.append(torch.einsum("g,gdx->dx", u[:, j], w_key_HkvDX[:, [d0, d1]]))
        if b_key_HkvD is not None:
            rows_b.append(torch.einsum("g,gd->d", u[:, j], b_key_HkvD[:, [d0, d1]]))
    hidden = w_key_HkvDX.shape[-1]
    w_rope = torch.cat(rows_w) if rows_w else w_key_HkvDX.new_zeros(0, hidden)
    b_rope = None if b_key_HkvD is None else (torch.cat(rows_b) if rows_b else b_key_HkvD.new_zeros(0))
    return w_nope, b_nope, w_rope, b_rope
