"""Magnitude scorers: Lp norms of every member's slices (Li et al., "Pruning Filters for
Efficient ConvNets", ICLR 2017), BN scale (Liu et al., "Network Slimming", ICCV 2017), LAMP (Lee et
al., "Layer-adaptive sparsity for the magnitude-based pruning", ICLR 2021) and random."""
from __future__ import annotations

from typing import Optional

import torch

from ..graph.group import Group
from .base import (Normalizer, Reduction, cached_per_index, lp_per_index, normalize,
                   reduce_members, scored_members, units_matrix)


class MagnitudeImportance:
    """Score a unit by ``sum |w|^p`` over every parameter slice it touches.

    Args:
        p: the norm's power (1 for L1, 2 for L2). (default: ``2``)
        reduction: how member scores combine: ``"sum"``, ``"mean"``, ``"max"``, ``"first"``.
            (default: ``"mean"``)
        normalizer: per-group rescaling for global ranking: ``"mean"``, ``"max"``, ``"sum"``,
            ``"standardization"``, ``"lamp"`` or None. (default: ``"mean"``)
        roles: only members with these roles (``"out"``, ``"in"``, ``"norm"``, ``"bias"``);
            None scores every parameter member but running statistics. (default: None)
    """

    def __init__(self, p: float = 2, reduction: Reduction = "mean", normalizer: Normalizer = "mean",
                 roles: Optional[tuple[str, ...]] = None) -> None:
        self.p, self.reduction, self.normalizer, self.roles = p, reduction, normalizer, roles

    def __call__(self, group: Group, graph: object) -> Optional[torch.Tensor]:
        members = scored_members(group, self.roles)
        values = [cached_per_index(graph, m, ("lp", self.p), lambda t, d: lp_per_index(t, d, self.p))
                  for m in members]
        s = reduce_members(units_matrix(group, members, values) if members else [], self.reduction)
        return None if s is None else normalize(s, self.normalizer)


class LAMPImportance(MagnitudeImportance):
    """Magnitude (p=2) with LAMP normalisation: ``s_u = w_u / sum_{v >= u} w_v`` (sorted)."""

    def __init__(self, p: float = 2, reduction: Reduction = "mean") -> None:
        super().__init__(p=p, reduction=reduction, normalizer="lamp")


class BNScaleImportance:
    """Score a unit by ``|gamma|`` of its normalisation layers; groups without one are skipped."""

    def __init__(self, normalizer: Normalizer = "mean") -> None:
        self.normalizer = normalizer

    def __call__(self, group: Group, graph: object) -> Optional[torch.Tensor]:
        members = scored_members(group, ("norm",))
        values = [cached_per_index(graph, m, ("lp", 1), lambda t, d: lp_per_index(t, d, 1))
                  for m in members]
        s = reduce_members(units_matrix(group, members, values) if members else [], "sum")
        return None if s is None else normalize(s, self.normalizer)


class RandomImportance:
    """Uniform random scores (a baseline); draws from torch's global generator."""

    def __call__(self, group: Group, graph: object) -> Optional[torch.Tensor]:
        return torch.rand(group.num_units, dtype=torch.float64)
