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
    """Turn the components into groups; components without any parameter are left out."""
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
    # The signature of a unit: the sorted tuple of spaces (and counts) it touches.
    order = np.lexsort((elems, space_idx, lab))
    elems, lab, space_idx = elems[order], lab[order], space_idx[order]
    pairs, counts = np.unique(np.stack([lab, space_idx]), axis=1, return_counts=True)
    bounds = np.flatnonzero(np.diff(pairs[0])) + 1
    sig_of: dict[tuple, list[int]] = {}
    for chunk, cnt in zip(np.split(pairs, bounds, axis=1), np.split(counts, bounds)):
        sig = tuple(zip(chunk[1].tolist(), cnt.tolist()))
        sig_of.setdefault(sig, []).append(int(chunk[0, 0]))
    groups = []
    for gid, (sig, labels) in enumerate(sorted(sig_of.items(), key=lambda kv: min(kv[1]))):
        labels_arr = np.array(sorted(labels), dtype=np.int64)
        unit_of = {int(l): u for u, l in enumerate(labels_arr)}
        members = []
        in_group = np.isin(lab, labels_arr)
        g_elems, g_lab, g_space = elems[in_group], lab[in_group], space_idx[in_group]
        for s_i, _ in sig:
            m = g_space == s_i
            space = table.order[s_i]
            idx = g_elems[m] - table.offset[space]
            units = np.array([unit_of[int(l)] for l in g_lab[m]], dtype=np.int64)
            o = np.lexsort((idx, units))
            members.append(Member(space, torch.from_numpy(idx[o]), torch.from_numpy(units[o]),
                                  roles.get(space)))
        groups.append(Group(gid, len(labels_arr), members, labels_arr))
    return groups
