"""Global allocation: rank every unit of every group by its (normalised) score together.

Each group keeps at least ``1 - max_ratio`` of its units and always at least one, so a global
threshold can never empty a layer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..graph.group import Group
from .uniform import keep_count


def global_(groups: list[Group], scores: dict[int, torch.Tensor], ratio: float,
            round_to: Optional[int] = None, max_ratio: float = 0.9) -> dict[int, torch.Tensor]:
    """Drop the ``ratio`` lowest-scoring units over all scored groups, within per-group caps."""
    cand_s, cand_g, cand_u, total = [], [], [], 0
    for g in groups:
        s = scores.get(g.id)
        if s is None:
            continue
        total += g.num_units
        cap = g.num_units - keep_count(g.num_units, max_ratio, None, g.width, max_ratio)
        order = torch.argsort(s, stable=True)[:cap]
        cand_s.append(s[order].double())
        cand_g.append(torch.full((len(order),), g.id))
        cand_u.append(order)
    if not cand_s:
        return {}
    n = min(int(math.floor(total * ratio + 1e-9)), sum(len(c) for c in cand_s))
    sel = torch.argsort(torch.cat(cand_s), stable=True)[:n]
    gids, units = torch.cat(cand_g)[sel], torch.cat(cand_u)[sel]
    out: dict[int, torch.Tensor] = {}
    by_id = {g.id: g for g in groups}
    for gid in gids.unique().tolist():
        chosen = units[gids == gid]
        g = by_id[gid]
        if round_to:
            keep = keep_count(g.num_units, len(chosen) / g.num_units, round_to, g.width, 1.0)
            order = torch.argsort(scores[gid], stable=True)
            chosen = order[: g.num_units - keep]
        if len(chosen):
            out[gid] = chosen.sort().values
    return out
