"""Per-group uniform allocation: every group loses the same fraction of its units."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..graph.group import Group


def keep_count(num_units: int, ratio: float, round_to: Optional[int], width: int,
               max_ratio: float) -> int:
    """Units to keep in a group of ``num_units`` at ``ratio``; never 0, rounded if asked.

    ``round_to`` counts channels: with units ``width`` channels wide the kept units are a multiple
    of ``round_to / gcd(round_to, width)`` (when the group has that many).
    """
    drop = min(int(math.floor(num_units * ratio + 1e-9)), int(math.floor(num_units * max_ratio + 1e-9)))
    keep = max(num_units - drop, 1)
    if round_to and round_to > 1:
        step = round_to // math.gcd(round_to, max(width, 1))
        if num_units >= step:
            keep = min(max(step, int(round(keep / step)) * step), num_units)
    return keep


def uniform(groups: list[Group], scores: dict[int, torch.Tensor], ratio: float,
            round_to: Optional[int] = None, max_ratio: float = 1.0,
            ratio_of: Optional[dict[int, float]] = None) -> dict[int, torch.Tensor]:
    """Drop the ``ratio`` (or ``ratio_of[group id]``) lowest-scoring units of every scored group."""
    out = {}
    for g in groups:
        s = scores.get(g.id)
        if s is None:
            continue
        r = ratio_of.get(g.id, ratio) if ratio_of else ratio
        keep = keep_count(g.num_units, r, round_to, g.width, max_ratio)
        n_drop = g.num_units - keep
        if n_drop > 0:
            out[g.id] = torch.argsort(s, stable=True)[:n_drop].sort().values
    return out
