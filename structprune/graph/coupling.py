"""The connected-components solver over spaces and the coupling records rules emit.

Spaces (:class:`Space`, typed by kind and level) and the records (:class:`Couple`,
:class:`Freeze`, :class:`Role`, :class:`Choice`) are part of the rule contract in
:mod:`structprune.rules`, imported here. Every index of every space is one element of a
union-find; the records say which elements are the same unit, which may never be removed, and,
where an op can be coupled in several valid ways, which alternatives exist. The connected
components of that relation are the units: the sets of indices that must be removed together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..rules import (Choice as Choice, Couple as Couple, Freeze as Freeze, IndexLike as IndexLike,
                     Level as Level, Record as Record, Role as Role, Space as Space,
                     SpaceKind as SpaceKind)


class SpaceTable:
    """Give every index of every space a global element id; id 0 is the frozen sentinel.

    :meth:`merge` first unites the spaces that plain records tie index for index (an activation
    and the ReLU after it, a conv's output and its weight's dim 0): each such class of spaces
    shares one block of element ids, so the element-level solve only sees what differs.
    """

    def __init__(self) -> None:
        self.offset: dict[Space, int] = {}
        self.size: dict[Space, int] = {}
        self.order: list[Space] = []
        self.total = 1
        self._classes: Optional[list[list[Space]]] = None

    def add(self, space: Space, n: int) -> None:
        if self._classes is not None:
            raise RuntimeError("SpaceTable.add after merge(): build a new table")
        if space not in self.offset:
            self.offset[space] = self.total
            self.size[space] = n
            self.order.append(space)
            self.total += n

    def __contains__(self, space: Space) -> bool:
        return space in self.offset

    @property
    def classes(self) -> list[list[Space]]:
        """Spaces sharing one block of element ids, in block order (one space each unmerged)."""
        if self._classes is None:
            return [[s] for s in self.order]
        return self._classes

    def merge(self, records: Sequence[Record]) -> list[Record]:
        """Unite the spaces that whole-space couplings of equal size tie, give each class one
        block of element ids and return the records the element-level solve still needs."""
        parent = {s: s for s in self.order}

        def find(s: Space) -> Space:
            while parent[s] is not s:
                parent[s] = parent[parent[s]]
                s = parent[s]
            return s

        rest: list[Record] = []
        for r in records:
            if (isinstance(r, Couple) and r.a_idx is None and r.b_idx is None and r.a in parent
                    and r.b in parent and self.size[r.a] == self.size[r.b]):
                ra, rb = find(r.a), find(r.b)
                if ra is not rb:
                    parent[rb] = ra
            else:
                rest.append(r)
        blocks: dict[Space, list[Space]] = {}
        for s in self.order:
            blocks.setdefault(find(s), []).append(s)
        total = 1
        for members in blocks.values():
            for s in members:
                self.offset[s] = total
            total += self.size[members[0]]
        self.total, self._classes = total, list(blocks.values())
        return rest

    def multiplicity(self) -> np.ndarray:
        """For every element id, how many spaces share it (1 everywhere before :meth:`merge`)."""
        counts = [len(c) for c in self.classes]
        sizes = [self.size[c[0]] for c in self.classes]
        return np.concatenate([[1], np.repeat(np.asarray(counts, dtype=np.int64),
                                              np.asarray(sizes, dtype=np.int64))])

    def ids(self, space: Space, idx: IndexLike) -> np.ndarray:
        n = self.size[space]
        if idx is None:
            return np.arange(n, dtype=np.int64) + self.offset[space]
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for space {space!r} of size {n}")
        return idx + self.offset[space]

    def starts(self) -> np.ndarray:
        """First element id of every class's block, in block order."""
        return np.array([self.offset[c[0]] for c in self.classes], dtype=np.int64)


@dataclass
class Solution:
    """The components: ``label[e]`` for every element id, ``frozen_label`` is the sentinel's."""

    label: np.ndarray
    frozen_label: int
    freeze_reasons: dict[Space, str] = field(default_factory=dict)

    def is_frozen(self, ids: np.ndarray) -> np.ndarray:
        return self.label[ids] == self.frozen_label


def _edges(table: SpaceTable, records: Iterable[Record], reasons: dict[Space, str]):
    a_parts, b_parts = [], []
    for r in records:
        if isinstance(r, Couple):
            if r.a not in table or r.b not in table:
                continue
            a, b = table.ids(r.a, r.a_idx), table.ids(r.b, r.b_idx)
            if a.shape != b.shape:
                raise ValueError(f"coupling {r.a!r} ~ {r.b!r} has {a.size} vs {b.size} indices")
            a_parts.append(a)
            b_parts.append(b)
        elif isinstance(r, Freeze):
            if r.space not in table:
                continue
            ids = table.ids(r.space, r.idx)
            a_parts.append(ids)
            b_parts.append(np.zeros_like(ids))
            reasons.setdefault(r.space, r.reason)
        elif isinstance(r, Choice):
            a, b = _edges(table, r.options[r.chosen][1], reasons)
            a_parts.append(a)
            b_parts.append(b)
    if not a_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a_parts), np.concatenate(b_parts)


def _components(total: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    data = np.ones(a.size, dtype=np.int8)
    mat = coo_matrix((data, (a, b)), shape=(total, total)).tocsr()
    _, label = connected_components(mat, directed=False)
    return label, int(label[0])


def solve(table: SpaceTable, records: list[Record]) -> Solution:
    """Compute the connected components, resolving every :class:`Choice` to a free option.

    Options whose key is frozen even with no choice coupled at all are skipped first. Then all
    choices whose key came out frozen move to their next option together, for a few rounds,
    keeping the configuration that leaves the fewest indices unprunable (frozen, or in a space
    left as one single unit). Then once more from there with every choice whose key is
    unprunable on its free option with the largest key space. Finally, in graph order, single
    frozen choices move one at a time until none can. Any outcome is correct (every option is
    a valid coupling); the search only looks for the one that leaves the most to prune. The
    edges of plain records and of each option are built once.
    """
    records = table.merge(records)
    choices = [r for r in records if isinstance(r, Choice)]
    reasons: dict[Space, str] = {}
    plain = [r for r in records if not isinstance(r, Choice)]
    pa, pb = _edges(table, plain, reasons)
    if not choices:
        label, frozen = _components(table.total, pa, pb)
        return Solution(label, frozen, reasons)
    label, frozen = _components(table.total, pa, pb)

    def key_frozen(key: Space, lab: np.ndarray, fz: int) -> bool:
        """A choice's key space is frozen (an empty space has nothing to freeze)."""
        return key in table and table.size[key] > 0 and lab[table.offset[key]] == fz

    free_options = [[k for k, (key, _) in enumerate(c.options)
                     if key in table and not key_frozen(key, label, frozen)] for c in choices]
    option_edges: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    option_reasons: dict[Space, str] = {}

    def run() -> tuple[np.ndarray, int]:
        parts_a, parts_b = [pa], [pb]
        for i, c in enumerate(choices):
            key = (i, c.chosen)
            if key not in option_edges:
                option_edges[key] = _edges(table, c.options[c.chosen][1], option_reasons)
            parts_a.append(option_edges[key][0])
            parts_b.append(option_edges[key][1])
        return _components(table.total, np.concatenate(parts_a), np.concatenate(parts_b))

    weight = table.multiplicity()

    nonempty = [c for c in table.classes if table.size[c[0]] > 0]
    starts = np.array([table.offset[c[0]] for c in nonempty], dtype=np.int64)
    sizes = np.array([table.size[c[0]] for c in nonempty], dtype=np.int64)

    def one_unit(lab: np.ndarray) -> np.ndarray:
        """Per element id: its space (of size > 1) has all its indices in one unit. Removing
        that unit would remove the whole dim, so such a space cannot be pruned either."""
        out = np.zeros(len(lab), dtype=bool)
        if len(starts) and (sizes > 1).any():
            lo = np.minimum.reduceat(lab, starts)
            hi = np.maximum.reduceat(lab, starts)
            # the non-empty blocks tile ids 1.. in order
            out[1:] = np.repeat((sizes > 1) & (lo == hi), sizes)
        return out

    def n_frozen_of(lab: np.ndarray, fz: int) -> int:
        """Indices that cannot be pruned over every space (a merged element counts once per
        space it is): frozen, or in a space left as one single unit."""
        return int(weight[(lab == fz) | one_unit(lab)].sum())

    def stuck(lab: np.ndarray, fz: int) -> list[int]:
        return [i for i, c in enumerate(choices) if len(c.options) > 1
                and key_frozen(c.options[c.chosen][0], lab, fz)]

    def widest(c: Choice, free: list[int]) -> int:
        return max(free, key=lambda k: (table.size.get(c.options[k][0], 0), -k))

    def moves(lab: np.ndarray, fz: int) -> None:
        """Rounds of moving every stuck choice to its next option, keeping the best."""
        nonlocal best
        for _ in range(2 * max(len(c.options) for c in choices) + 1):
            n_frozen = n_frozen_of(lab, fz)
            if best is None or n_frozen < best[0]:
                best = (n_frozen, [c.chosen for c in choices])
            todo = stuck(lab, fz)
            if not todo:
                break
            for i in todo:
                c = choices[i]
                c.chosen = (c.chosen + 1) % len(c.options)
            lab, fz = run()

    best: Optional[tuple[int, list[int]]] = None
    for c, free in zip(choices, free_options):
        c.chosen = free[0] if free else 0
    moves(*run())
    # A second start: the choices whose key came out frozen or as one single unit move to
    # their free option with the most units. ResNeSt's split attention views its channels as
    # (radix, C) in several places that must all pick C together (with its grouped conv pruned
    # by position within the groups), which no single move finds.
    assert best is not None
    for c, k in zip(choices, best[1]):
        c.chosen = k
    label, frozen = run()
    dead = (label == frozen) | one_unit(label)
    moved = False
    for c, free in zip(choices, free_options):
        key = c.options[c.chosen][0]
        if free and key in table and table.size[key] and dead[table.offset[key]]:
            k = widest(c, free)
            moved |= k != c.chosen
            c.chosen = k
    if moved:
        moves(*run())
    for c, k in zip(choices, best[1]):
        c.chosen = k
    # Steepest descent: try every other option of every stuck choice, take the single move that
    # frees the most, until no move helps. Choices whose moves never help are not tried again.
    label, frozen = run()
    current = n_frozen_of(label, frozen)
    hopeless: set[int] = set()
    for _ in range(len(choices) + 1):
        best_move = None
        for i in stuck(label, frozen):
            if i in hopeless:
                continue
            c, keep, helped = choices[i], choices[i].chosen, False
            for k in range(len(c.options)):
                if k == keep:
                    continue
                c.chosen = k
                lab_k, fz_k = run()
                n_k = n_frozen_of(lab_k, fz_k)
                if n_k < current and (best_move is None or n_k < best_move[0]):
                    best_move, helped = (n_k, i, k, lab_k, fz_k), True
            c.chosen = keep
            if not helped:
                hopeless.add(i)
        if best_move is None:
            break
        current, i, k, label, frozen = best_move
        choices[i].chosen = k
    reasons.update({k: v for k, v in option_reasons.items() if k not in reasons})
    return Solution(label, frozen, reasons)
