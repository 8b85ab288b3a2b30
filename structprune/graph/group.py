"""Units, groups and their members: what one removable index class touches.

A **unit** is one connected component of the coupling relation. A **group** collects the units
whose members span the same spaces (the 64 channels of one residual stage, the 3 heads of one
attention block). A **member** is the slice of one space a group touches: for a parameter space
it is a parameter slice (module, parameter name, dim, indices), for a node space an activation
slice (fx node name, dim, indices). ``Member.unit[k]`` says which unit ``Member.index[k]`` is in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .coupling import Solution, Space, SpaceTable


@dataclass(frozen=True)
class Member:
    """One space's slice in a group: ``index[k]`` of ``space`` belongs to unit ``unit[k]``."""

    space: Space
    index: torch.Tensor  # [K] long, sorted by unit
    unit: torch.Tensor  # [K] long
    role: Optional[str] = None  # for parameters: "out", "in", "norm", "bias" (who set it)

    @property
    def is_param(self) -> bool:
        return self.space.is_param

    @property
    def module(self) -> str:
        """Module path of a parameter member ('' for the root); the node name otherwise."""
        if self.is_param:
            return self.space.key[1:].rpartition(".")[0]
        return self.space.node_name

    @property
    def name(self) -> str:
        """Parameter name of a parameter member (``weight``), '' for activations."""
        return self.space.key[1:].rpartition(".")[2] if self.is_param else ""

    @property
    def qualname(self) -> str:
        return self.space.key[1:] if self.is_param else self.space.key

    @property
    def dim(self) -> int:
        return self.space.dim

    def __repr__(self) -> str:
        return f"{self.space!r}x{self.index.numel()}"


@dataclass(frozen=True)
class Unit:
    """One removable index class: the indices of every space that go together."""

    group: "Group"
    index: int

    @property
    def members(self) -> list[tuple[Member, torch.Tensor]]:
        """``(member, indices)`` for every member, the indices being this unit's slice."""
        out = []
        for m in self.group.members:
            sel = m.index[m.unit == self.index]
            if sel.numel():
                out.append((m, sel))
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{m.space!r}{idx.tolist()}" for m, idx in self.members[:4])
        more = "" if len(self.group.members) <= 4 else ", ..."
        return f"Unit({self.group.id}.{self.index}: {parts}{more})"


@dataclass(eq=False)
class Group:
    """Units spanning the same spaces, with the members (parameter and activation slices)."""

    id: int
    num_units: int
    members: list[Member]
    labels: np.ndarray = field(repr=False)  # component label of each unit

    @property
    def units(self) -> list[Unit]:
        return [Unit(self, i) for i in range(self.num_units)]

    @property
    def spaces(self) -> list[Space]:
        return [m.space for m in self.members]

    @property
    def params(self) -> list[Member]:
        return [m for m in self.members if m.is_param]

    @property
    def activations(self) -> list[Member]:
        return [m for m in self.members if not m.is_param]

    @property
    def width(self) -> int:
        """Indices per unit in the widest member (1 for channels, head_dim for heads)."""
        return max(int(m.index.numel()) // max(self.num_units, 1) for m in self.members)

    def __repr__(self) -> str:
        params = sorted({m.qualname for m in self.params})
        shown = ", ".join(params[:6]) + (f", ... (+{len(params) - 6})" if len(params) > 6 else "")
        return (f"Group {self.id}: {self.num_units} units x {self.width} "
                f"over {len(self.members)} spaces [{shown}]")


def build_groups(table: SpaceTable, sol: Solution, roles: dict[Space, str]) -> list[Group]:
    """Turn the components into groups; components without any parameter are left out.

    Vectorised: units are grouped by a 128-bit hash of their (space, count) signature.
    """
    label = sol.label
    starts = table.starts()
    elems = np.arange(1, table.total, dtype=np.int64)
    lab = label[elems]
    keep = lab != sol.frozen_label
    elems, lab = elems[keep], lab[keep]
    space_idx = np.searchsorted(starts, elems, side="right") - 1
    is_param = np.array([s.is_param for s in table.order], dtype=bool)
    has_param = np.zeros(label.max() + 1, dtype=bool)
    has_param[lab[is_param[space_idx]]] = True
    sel = has_param[lab]
    elems, lab, space_idx = elems[sel], lab[sel], space_idx[sel]
    if elems.size == 0:
        return []
    # Signature hash of each label: sum over its elements of a random weight of their space.
    rng = np.random.default_rng(12345)
    w1 = rng.integers(1, 2**62, size=len(table.order), dtype=np.int64)
    w2 = rng.integers(1, 2**62, size=len(table.order), dtype=np.int64)
    ulab, inv = np.unique(lab, return_inverse=True)
    h1 = np.zeros(len(ulab), dtype=np.int64)
    h2 = np.zeros(len(ulab), dtype=np.int64)
    with np.errstate(over="ignore"):
        np.add.at(h1, inv, w1[space_idx])
        np.add.at(h2, inv, w2[space_idx])
    _, sig = np.unique(np.stack([h1, h2], axis=1), axis=0, return_inverse=True)
    sig = sig.reshape(-1)
    # Order groups by their first label (graph order), units inside a group by label.
    first = np.full(sig.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, sig, ulab)
    group_rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    gid_of_ulab = group_rank[sig]
    order_u = np.lexsort((ulab, gid_of_ulab))
    unit_of_ulab = np.empty(len(ulab), dtype=np.int64)
    counts_per_group = np.bincount(gid_of_ulab)
    offsets = np.concatenate([[0], np.cumsum(counts_per_group)[:-1]])
    unit_of_ulab[order_u] = np.arange(len(ulab)) - offsets[gid_of_ulab[order_u]]
    e_gid, e_unit = gid_of_ulab[inv], unit_of_ulab[inv]
    # One pass over elements sorted by (group, space, unit, index).
    o = np.lexsort((elems, e_unit, space_idx, e_gid))
    elems, e_gid, e_unit, space_idx = elems[o], e_gid[o], e_unit[o], space_idx[o]
    cut = np.flatnonzero((np.diff(e_gid) != 0) | (np.diff(space_idx) != 0)) + 1
    bounds = np.concatenate([[0], cut, [len(elems)]])
    members: list[list[Member]] = [[] for _ in range(len(counts_per_group))]
    for a, b in zip(bounds[:-1], bounds[1:]):
        space = table.order[space_idx[a]]
        idx = elems[a:b] - table.offset[space]
        members[e_gid[a]].append(Member(space, torch.from_numpy(idx.copy()),
                                        torch.from_numpy(e_unit[a:b].copy()), roles.get(space)))
    labels_sorted = ulab[order_u]
    groups = []
    for gid, n in enumerate(counts_per_group.tolist()):
        labs = labels_sorted[offsets[gid]:offsets[gid] + n]
        groups.append(Group(gid, n, members[gid], labs))
    return groups
