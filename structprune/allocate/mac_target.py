"""Allocation to a MAC budget: find the smallest ratio whose plan keeps at most ``target`` of the
model's multiply-accumulates (bisection over the ratio of the chosen base allocator)."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import PlanError


def mac_target(plan_for: Callable[[float], dict[int, torch.Tensor]],
               macs_of: Callable[[dict[int, torch.Tensor]], int], base_macs: int, target: float,
               iters: int = 30) -> dict[int, torch.Tensor]:
    """Bisection on the ratio so that ``macs_of(plan) <= target * base_macs`` with the least pruning.

    Raises:
        PlanError: even the largest ratio cannot reach the budget (names the MACs it reaches).
    """
    budget = target * base_macs
    lo, hi = 0.0, 0.999
    best = plan_for(hi)
    reached = macs_of(best)
    if reached > budget:
        raise PlanError(f"target_macs={target:.3g} is out of reach: pruning everything prunable keeps "
                        f"{reached / max(base_macs, 1):.3f} of the MACs (frozen ops and graph "
                        f"inputs/outputs cannot shrink); ask for at least that fraction")
    for _ in range(iters):
        mid = (lo + hi) / 2
        drops = plan_for(mid)
        if macs_of(drops) <= budget:
            hi, best = mid, drops
        else:
            lo = mid
    return best
