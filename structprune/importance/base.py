"""The :class:`Importance` protocol and the helpers every scorer shares.

An importance turns the parameter slices of a group's members into one score per unit
(``[num_units]``, low = prune first). Scorers compute a per-index value for each parameter member,
sum it into the member's units (a unit may span several indices: a group of a grouped conv, a
head), combine the members (``reduction``) and rescale (``normalizer``) so that global ranking
can compare groups.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Hashable, Literal, Optional, Protocol, Union, runtime_checkable

import torch

from ..graph.group import Group, Member
from ..scratch import PassLocal, temporary

Reduction = Literal["sum", "mean", "max", "first"]
Normalizer = Optional[Literal["mean", "max", "sum", "standardization", "lamp"]]


@runtime_checkable
class Importance(Protocol):
    """Score the units of a group: ``imp(group, graph) -> Tensor[num_units]`` or None (skip it)."""

    def __call__(self, group: Group, graph: object) -> Optional[torch.Tensor]: ...


def tensor_of(graph: object, member: Member) -> torch.Tensor:
    """The parameter/buffer a member slices, from the traced module (shared with the model)."""
    owner_path, _, name = member.qualname.rpartition(".")
    modules = getattr(graph, "modules", None)  # the graph's path -> module table
    owner = modules.get(owner_path) if isinstance(modules, dict) else None
    if owner is None:
        gm = graph.graph_module  # type: ignore[attr-defined]
        owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, name)


def lp_per_index(t: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """``sum |t|^p`` over every dim but ``dim``: ``[t.shape[dim]]``, in at most two sweeps.

    The dims before ``dim`` are summed as columns of a 2-d view (contiguous rows, one pass),
    then the dims after it; both are memory-bound reductions over contiguous data.
    """
    t = t.detach()
    n = t.shape[dim]
    if p == 2 and dim == 0 and t.numel():
        return torch.linalg.vector_norm(t.reshape(n, -1), 2, dim=1).square().double().cpu()
    a = temporary(t.shape, t.dtype, t.device)
    if p == 2:
        torch.mul(t, t, out=a)
    else:
        torch.abs(t, out=a).pow_(p)
    before = math.prod(t.shape[:dim])
    if before > 1:
        a = a.reshape(before, -1).sum(0)
    return a.reshape(n, -1).sum(1).double().cpu()


_PASS = PassLocal()


def scoring_pass() -> contextlib.AbstractContextManager:
    """Memoise per-index values for the duration of one scoring pass (see
    :func:`cached_per_index`); weights and gradients may change between passes."""
    return _PASS.scope()


def cached_per_index(graph: object, member: Member, key: Hashable,
                     fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``fn(tensor, dim)`` for a member's tensor, computed once per scoring pass.

    One tensor dim is often a member of many groups (in a DenseNet, a conv's input channels
    are split over every earlier layer's group), so inside :func:`scoring_pass` per-index values
    are computed once per ``(tensor, dim, key)``. Nothing is kept across passes: in-place writes
    through ``.data`` are invisible to version counters, and gradient tensors are recycled.
    """
    t = tensor_of(graph, member)
    cache = _PASS.table
    if cache is None:
        return fn(t, member.dim)
    k = (id(t), member.dim, key)
    hit = cache.get(k)
    if hit is None:
        hit = cache[k] = (t, fn(t, member.dim))  # holds t: its id stays unique in the pass
    return hit[1]


def to_units(group: Group, member: Member, values: torch.Tensor) -> torch.Tensor:
    """Sum per-index ``values`` (indexed like the member's tensor dim) into the group's units."""
    out = torch.zeros(group.num_units, dtype=values.dtype)
    return out.index_add_(0, member.unit, values[member.index])


def units_matrix(group: Group, members: list[Member], values: list[torch.Tensor]) -> torch.Tensor:
    """``[len(members), num_units]``: row k is :func:`to_units` of ``members[k]``, ``values[k]``.

    Members of one space class share their index tensors; their values are gathered together
    and everything is summed into units with one ``index_add``.
    """
    n = group.num_units
    clusters: dict[int, list[int]] = {}
    for k, m in enumerate(members):
        clusters.setdefault(id(m.index), []).append(k)
    pos, vals = [], []
    for ks in clusters.values():
        m = members[ks[0]]
        vals.append(torch.stack([values[k].double() for k in ks])[:, m.index].reshape(-1))
        pos.append((torch.as_tensor(ks)[:, None] * n + m.unit[None, :]).reshape(-1))
    out = torch.zeros(len(members) * n, dtype=torch.float64)
    return out.index_add_(0, torch.cat(pos), torch.cat(vals)).view(len(members), n)


def reduce_members(scores: Union[list[torch.Tensor], torch.Tensor],
                   reduction: Reduction) -> Optional[torch.Tensor]:
    """Combine per-member unit scores (a list, or the rows of a matrix) into one per unit."""
    if len(scores) == 0:
        return None
    s = scores if isinstance(scores, torch.Tensor) else torch.stack(scores)
    if reduction == "sum":
        return s.sum(0)
    if reduction == "mean":
        return s.mean(0)
    if reduction == "max":
        return s.max(0).values
    if reduction == "first":
        return s[0]
    raise ValueError(f"unknown reduction {reduction!r}; choose sum, mean, max or first")


def normalize(s: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    if normalizer is None:
        return s
    if normalizer == "mean":
        return s / (s.mean() + 1e-12)
    if normalizer == "max":
        return s / (s.max() + 1e-12)
    if normalizer == "sum":
        return s / (s.sum() + 1e-12)
    if normalizer == "standardization":
        return (s - s.min()) / (s.max() - s.min() + 1e-12)
    if normalizer == "lamp":
        order = torch.argsort(s)
        sorted_s = s[order]
        tail = sorted_s.flip(0).cumsum(0).flip(0)  # sum over v >= u in ascending order
        out = torch.empty_like(s)
        out[order] = sorted_s / (tail + 1e-12)
        return out
    raise ValueError(f"unknown normalizer {normalizer!r}; choose mean, max, sum, "
                     f"standardization, lamp or None")


def scored_members(group: Group, roles: Optional[tuple[str, ...]]) -> list[Member]:
    """Parameter members to score: those with one of ``roles`` (None: all but running stats)."""
    if roles is None:
        return [m for m in group.params if m.role != "stat"]
    return [m for m in group.params if m.role in roles]
