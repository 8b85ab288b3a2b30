"""FPGM (He et al., "Filter Pruning via Geometric Median", CVPR 2019): filters close to the
others (near the geometric median) are redundant and go first."""
from __future__ import annotations

from typing import Optional

import torch

from ..graph.group import Group
from .base import Normalizer, Reduction, normalize, reduce_members, scored_members, tensor_of, to_units


class FPGMImportance:
    """Score a unit by the summed Euclidean distance of its slices to the other units' slices.

    Uses the members that produce the unit (role ``out``; all members if there are none).
    """

    def __init__(self, reduction: Reduction = "sum", normalizer: Normalizer = "mean") -> None:
        self.reduction, self.normalizer = reduction, normalizer

    def __call__(self, group: Group, graph: object) -> Optional[torch.Tensor]:
        members = scored_members(group, ("out",)) or scored_members(group, None)
        scores = []
        for m in members:
            t = tensor_of(graph, m).detach().double()
            rows = t.transpose(0, m.dim).reshape(t.shape[m.dim], -1)[m.index]  # [K, F]
            dist = torch.cdist(rows[None], rows[None])[0].sum(1).cpu()  # [K]
            per = torch.zeros(t.shape[m.dim], dtype=torch.float64)
            per[m.index] = dist
            scores.append(to_units(group, m, per))
        s = reduce_members(scores, self.reduction)
        return None if s is None else normalize(s, self.normalizer)
