"""A :class:`Plan`: which units of which groups to drop, and what that removes from every tensor."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import PlanError
from .macs import count_macs as count_macs
from .macs import count_params as count_params
from .rules import Space

if TYPE_CHECKING:
    from .graph.depgraph import DependencyGraph


@dataclass
class Plan:
    """Units to drop, per group id. Build one with :meth:`structprune.Pruner.plan` or by hand.

    Attributes:
        graph: the dependency graph the group ids refer to.
        drops: ``{group id: 1-D long tensor of unit indices to drop}``.
    """

    graph: "DependencyGraph"
    drops: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        groups = {g.id: g for g in self.graph.groups()}
        clean: dict[int, torch.Tensor] = {}
        for gid, units in self.drops.items():
            if gid not in groups:
                raise PlanError(f"plan names group {gid}, but the graph has groups "
                                f"0..{len(groups) - 1}")
            u = torch.as_tensor(units, dtype=torch.long).flatten().unique()
            g = groups[gid]
            if u.numel() and (int(u.min()) < 0 or int(u.max()) >= g.num_units):
                raise PlanError(f"plan drops unit {int(u.max())} of group {gid}, which has "
                                f"{g.num_units} units")
            if u.numel() >= g.num_units:
                names = sorted({m.module for m in g.params})[:3]
                raise PlanError(f"plan would drop all {g.num_units} units of group {gid} "
                                f"({', '.join(names)}...), emptying those layers; keep at least "
                                f"one unit per group")
            if u.numel():
                clean[gid] = u
        self.drops = clean

    @property
    def is_empty(self) -> bool:
        return not self.drops

    def num_dropped(self) -> int:
        return sum(int(u.numel()) for u in self.drops.values())

    def dropped_indices(self) -> dict[Space, np.ndarray]:
        """``{space: sorted dropped indices}`` over every node, item and parameter space."""
        out: dict[Space, list[np.ndarray]] = {}
        groups = {g.id: g for g in self.graph.groups()}
        for gid, units in self.drops.items():
            mask = np.zeros(groups[gid].num_units, dtype=bool)
            mask[units.numpy()] = True
            picked: dict[int, np.ndarray] = {}  # members of one space class share tensors
            for m in groups[gid].members:
                if id(m.unit) not in picked:
                    picked[id(m.unit)] = m.index.numpy()[mask[m.unit.numpy()]]
                if picked[id(m.unit)].size:
                    out.setdefault(m.space, []).append(picked[id(m.unit)])
        return {s: np.sort(v[0]) if len(v) == 1 else np.unique(np.concatenate(v))
                for s, v in out.items()}

    def new_sizes(self) -> dict[Space, int]:
        """The size of every space after the plan."""
        sizes = dict(self.graph.table.size)
        for s, idx in self.dropped_indices().items():
            sizes[s] -= len(idx)
        return sizes

    def activation_masks(self) -> dict[str, tuple[int, list[int]]]:
        """``{fx node name: (dim, dropped indices)}`` over ``graph.graph_module``'s nodes.

        Running that graph with those indices zeroed gives the pruned model's output (the oracle
        of DESIGN.md). A node with drops in two dims (a weight read by a functional op: its rows
        are units it produces, its columns units it reads) lists the dim whose units it
        produces (role ``"out"``: through the other, zeroed inputs already contribute nothing),
        else the dim with more drops; :meth:`activation_masks_all` lists every dim.
        """
        out: dict[str, tuple[int, list[int]]] = {}
        roles = getattr(self.graph, "roles", {})
        for name, dims in self.activation_masks_all().items():
            dim, idx = max(dims, key=lambda di: (
                roles.get(Space.activation(name, di[0])) == "out", len(di[1])))
            out[name] = (dim, idx)
        return out

    def activation_masks_all(self) -> dict[str, list[tuple[int, list[int]]]]:
        """``{fx node name: [(dim, dropped indices), ...]}`` with every dim that has drops."""
        out: dict[str, list[tuple[int, list[int]]]] = {}
        for s, idx in sorted(self.dropped_indices().items()):
            if not s.is_node_tensor:
                continue
            out.setdefault(s.name, []).append((s.dim, idx.tolist()))
        return out

    def __repr__(self) -> str:
        total = sum(g.num_units for g in self.graph.groups())
        return f"Plan(drop {self.num_dropped()} of {total} units in {len(self.drops)} groups)"

