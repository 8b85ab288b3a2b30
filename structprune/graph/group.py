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

from ..rules import Space
from .coupling import Solution, SpaceTable


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
            return self.space.module_path
        return self.space.node

    @property
    def name(self) -> str:
        """Parameter name of a parameter member (``weight``), '' for activations."""
        return self.space.attr_name if self.is_param else ""

    @property
    def qualname(self) -> str:
        """A parameter member's qualified name; the node name otherwise."""
        return self.space.name

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

    Vectorised over element ids: units are grouped by a 128-bit hash of the multiset of space
    classes (:meth:`SpaceTable.merge`) their elements lie in; every space of a class then gets
    the class's member slice. Members are listed in table order.
    """
    label = sol.label
    classes = table.classes
    starts = table.starts()
    if table.total <= 1:
        return []
    # Elements in label order: one stable sort, then per-label segments.
    lab_all = label[1:]
    o = np.argsort(lab_all, kind="stable")
    lab_sorted = lab_all[o]
    elems = o.astype(np.int64) + 1
    keep = lab_sorted != sol.frozen_label
    elems, lab = elems[keep], lab_sorted[keep]
    if elems.size == 0:
        return []
    cls_idx = np.searchsorted(starts, elems, side="right") - 1
    seg = np.flatnonzero(np.diff(lab)) + 1
    seg_start = np.concatenate([[0], seg])
    ulab = lab[seg_start]
    inv = np.repeat(np.arange(len(ulab)), np.diff(np.concatenate([seg_start, [lab.size]])))
    # Signature of each label: sum of a random weight per class over its elements (wrapping).
    rng = np.random.default_rng(12345)
    w1 = rng.integers(1, 2**62, size=len(classes), dtype=np.int64)
    w2 = rng.integers(1, 2**62, size=len(classes), dtype=np.int64)
    with np.errstate(over="ignore"):
        h1 = np.add.reduceat(w1[cls_idx], seg_start)
        h2 = np.add.reduceat(w2[cls_idx], seg_start)
    cls_param = np.array([any(sp.is_param for sp in c) for c in classes], dtype=bool)
    has_param = np.logical_or.reduceat(cls_param[cls_idx], seg_start)
    sig = np.full(len(ulab), -1, dtype=np.int64)
    if has_param.any():
        a, b = h1[has_param], h2[has_param]
        o = np.lexsort((b, a))  # ids of distinct (a, b) pairs, without a structured sort
        new = np.ones(o.size, dtype=bool)
        new[1:] = (a[o][1:] != a[o][:-1]) | (b[o][1:] != b[o][:-1])
        inv_sig = np.empty(o.size, dtype=np.int64)
        inv_sig[o] = np.cumsum(new) - 1
        sig[has_param] = inv_sig
    if not has_param.any():
        return []
    # Order groups by their first label (graph order), units inside a group by label.
    n_sig = int(sig.max()) + 1
    first = np.full(n_sig, np.iinfo(np.int64).max)
    valid = sig >= 0
    np.minimum.at(first, sig[valid], ulab[valid])
    group_rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    gid_of_ulab = np.where(valid, group_rank[np.maximum(sig, 0)], -1)
    counts_per_group = np.bincount(gid_of_ulab[valid], minlength=n_sig)
    offsets = np.concatenate([[0], np.cumsum(counts_per_group)[:-1]])
    # ulab is ascending, so a label's rank among its group's labels is its unit number.
    unit_of_ulab = np.full(len(ulab), -1, dtype=np.int64)
    order_u = np.lexsort((ulab[valid], gid_of_ulab[valid]))
    vpos = np.flatnonzero(valid)[order_u]
    unit_of_ulab[vpos] = np.arange(vpos.size) - offsets[gid_of_ulab[vpos]]
    e_gid, e_unit = gid_of_ulab[inv], unit_of_ulab[inv]
    sel = e_gid >= 0
    elems, e_gid, e_unit, cls_idx = elems[sel], e_gid[sel], e_unit[sel], cls_idx[sel]
    # One pass over elements sorted by (group, class, unit, index).
    o = np.lexsort((elems, e_unit, cls_idx, e_gid))
    elems, e_gid, e_unit, cls_idx = elems[o], e_gid[o], e_unit[o], cls_idx[o]
    cut = np.flatnonzero((np.diff(e_gid) != 0) | (np.diff(cls_idx) != 0)) + 1
    bounds = np.concatenate([[0], cut, [len(elems)]])
    position = {sp: k for k, sp in enumerate(table.order)}
    members: list[list[Member]] = [[] for _ in range(len(counts_per_group))]
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        ci = int(cls_idx[a])
        idx = torch.from_numpy(elems[a:b] - starts[ci])
        unit = torch.from_numpy(e_unit[a:b].copy())
        members[int(e_gid[a])] += [Member(sp, idx, unit, roles.get(sp)) for sp in classes[ci]]
    labels_sorted = ulab[vpos]
    groups = []
    for gid, n in enumerate(counts_per_group.tolist()):
        labs = labels_sorted[offsets[gid]:offsets[gid] + n]
        mem = sorted(members[gid], key=lambda m: position[m.space])
        groups.append(Group(gid, n, mem, labs))
    return groups
