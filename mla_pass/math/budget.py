"""Split a total KV-cache budget between sites, and within a site between rotary pairs and latent.

Each site offers choices (r, c): keep r rope units (a shared slot, or a pair per kv head; costing
``rope_cost`` cached values each) and a latent of c values, with a measured loss ``losses[r][c]`` (non-increasing
in c). We minimise the summed loss subject to Σ cost ≤ budget: a Lagrangian search (each site
independently minimises loss + μ·cost; bisect μ for the cheapest multiplier that fits), then the
values left over go one latent value at a time to whichever site's loss drops most. The result
never exceeds the budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SiteChoices:
    """The options of one site.

    Args:
        losses: rope units kept r → loss for each latent width c = 0 .. len − 1 ([C_r] tensor).
        rope_cost: cached values per kept rope unit (2 for a slot, 2·Hkv for a pair per kv head).
        fixed_cost: cached values that do not depend on the choice (a key-norm scale, for example).
        min_latent: the smallest latent width allowed.
    """
    losses: dict[int, torch.Tensor]
    rope_cost: int
    fixed_cost: int = 0
    min_latent: int = 1

    def cost(self, r: int, c: int) -> int:
        return self.fixed_cost + self.rope_cost * r + c

    def cheapest(self) -> int:
        return min(self.cost(r, self.min_latent) for r in self.losses)

    def best(self, mu: float) -> tuple[int, int]:
        """argmin over (r, c) of loss + μ·cost."""
        best, choice = None, None
        for r, loss in self.losses.items():
            cs = torch.arange(loss.shape[0], dtype=torch.float64)
            total = loss.detach().double() + mu * (self.rope_cost * r + cs)
            total[: self.min_latent] = float("inf")
            c = int(total.argmin())
            if best is None or total[c] < best:
                best, choice = float(total[c]), (r, c)
        return choice


class BudgetError(ValueError):
    pass


def allocate(sites: list[SiteChoices], budget: int, iterations: int = 60) -> list[tuple[int, int]]:
    """(r, c) per site with Σ cost ≤ ``budget``; raises ``BudgetError`` if even the cheapest
    choices do not fit (the message gives the minimum)."""
    minimum = sum(s.cheapest() for s in sites)
    if budget < minimum:
        raise BudgetError(f"a budget of {budget} cached values per token is below the minimum of {minimum}")
    total = lambda mu: sum(s.cost(*s.best(mu)) for s in sites)           # noqa: E731
    lo, hi = 0.0, 1.0
    while total(hi) > budget:                      # grow μ until the choices fit
        hi *= 4
        if hi > 1e30:                              # only ties left: take the cheapest choices
            break
    if total(lo) <= budget:
        hi = lo
    for _ in range(iterations):
        if hi - lo <= 1e-12 * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(mid) <= budget else (mid, hi)
    choices = [s.best(hi) for s in sites]
    if sum(s.cost(r, c) for s, (r, c) in zip(sites, choices)) > budget:
        choices = [min(((r, s.min_latent) for r in s.losses), key=lambda rc: s.cost(*rc)) for s in sites]
    return _fill(sites, choices, budget)


def _fill(sites: list[SiteChoices], choices: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Spend what is left one latent value at a time where the loss drops most."""
    choices = list(choices)
    left = budget - sum(s.cost(r, c) for s, (r, c) in zip(sites, choices))
    while left > 0:
        gains = []
        for i, (s, (r, c)) in enumerate(zip(sites, choices)):
            loss = s.losses[r]
            if c + 1 < loss.shape[0]:
                gains.append((float(loss[c] - loss[c + 1]), i))
        if not gains:
            break
        gain, i = max(gains)
        if gain <= 0:
            break
        r, c = choices[i]
        choices[i] = (r, c + 1)
        left -= 1
    return choices
