"""Gather and scatter: the ops message passing is made of.

A graph neural network layer (PyTorch Geometric's ``MessagePassing``, or a user's own) gathers
node features onto edges (``x_j = x[edge_index[0]]`` / ``x.index_select(0, edge_index[0])``),
computes per-edge messages with ordinary ops, and scatters them back onto nodes
(``out.scatter_add_(0, index, msg)``, ``scatter_reduce_`` with ``"sum"``, ``"mean"``,
``"amax"``, ``"amin"``, ``"prod"``, ``index_add_``). Captured with ``torch.export`` these are
the ATen ops below. Each one moves whole rows along the dim it indexes and treats every other
dim (the feature channels, the attention heads) entry by entry, independently, so:

- the indexed dim (nodes, edges) is tied to nothing here and stays whole (frozen): the next
  issue opens the graph's node and edge dims as prunable units of their own;
- every other dim maps index for index between the operands and the result: removing a channel
  removes it from the gathered messages and from the aggregate alike, and an aggregation of a
  channel that is zero in the masked original is zero as well (sum, mean, max, min, product).

Where an operand is narrower than the result along a non-indexed dim (``scatter`` reads only
``index.size(d)`` columns), that dim is left untied and so frozen: removing a column would
shift which source column lands where.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.fx as fx

from ..rules import (Address, Couple, CoupleContext, OpRule, Record, aten_ops, node_arg, op_name,
                     register)



def _self(ctx: CoupleContext) -> Any:
    """The tensor operated on: ATen's ``self``, a torch function's ``input``."""
    return ctx.arg(0, "self") if ctx.arg(0, "self") is not None else ctx.arg(0, "input")


def _addressed(ctx: CoupleContext, x: Any, dim: int, index: Any, result: bool = True
               ) -> Iterator[Record]:
    """The dim of ``x`` (and of the result, for a scatter) that the values of ``index`` address
    stays whole: removing a row would shift every row the index points to after it."""
    why = f"rows along dim {dim} are addressed by the index values of {ctx.node.name}"
    name = index.name if isinstance(index, fx.Node) else None
    for a in ([x, ctx.node] if result else [x]):
        if ctx.shape(a) is not None:
            yield Address(ctx.space(a, dim), why, index=name)


def _rows(ctx: CoupleContext, a: Any, b: Any, da: int, db: int) -> Iterator[Record]:
    """Row ``i`` of ``a`` along ``da`` is row ``i`` of ``b`` along ``db`` (graph units)."""
    sa, sb = ctx.shape(a), ctx.shape(b)
    if sa is not None and sb is not None and len(sa) > da and len(sb) > db and sa[da] == sb[db]:
        yield Couple(ctx.space(a, da), ctx.space(b, db))


def _is_bool(a: Any) -> bool:
    val = a.meta.get("val") if isinstance(a, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


@register(*aten_ops("index.Tensor", "_unsafe_index.Tensor"))
class IndexRule(OpRule):
    """``x[idx]``, ``x[:, idx]``, ``x[mask]`` (``aten.index(x, [None, idx])``): the dims the
    indices pick from are replaced by the indices' broadcast shape; every other dim of ``x``
    maps to its place in the result (PyTorch's advanced-indexing layout: the index dims go
    where the first index stands when the indexed dims are adjacent, first otherwise). A bool
    mask of k dims consumes k dims of ``x``."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        indices = ctx.arg(1, "indices")
        if isinstance(indices, (list, tuple)):
            yield from index_couplings(ctx, ctx.arg(0, "self"), list(indices))

    def graph_couple(self, ctx: CoupleContext) -> Iterator[Record]:
        indices = ctx.arg(1, "indices")
        if isinstance(indices, (list, tuple)):
            yield from index_rows(ctx, ctx.arg(0, "self"), list(indices))


def index_couplings(ctx: CoupleContext, x: Any, indices: list[Any]) -> Iterator[Record]:
    """The couplings of ``x[indices]`` in ATen's form: one entry per leading dim of ``x``, None
    for a whole dim (``:``) or an index tensor node (see :class:`IndexRule`). Also serves
    ``operator.getitem`` with tensor indices (``x[edge_index[0]]``, ``x[:, idx]``)."""
    sx, so = ctx.shape(x), ctx.out_shape
    if sx is None or so is None:
        return
    kept: list[int] = []  # dims of x not indexed, in order
    first: Optional[int] = None  # how many kept dims precede the first index
    picked: list[int] = []  # positions in ``indices`` that hold a tensor
    d = 0
    for k, t in enumerate(indices):
        if t is None:
            kept.append(d)
            d += 1
            continue
        st = ctx.shape(t)
        if st is None:
            return
        if first is None:
            first = len(kept)
        picked.append(k)
        d += len(st) if _is_bool(t) else 1
    kept += list(range(d, len(sx)))
    if first is None:
        yield from ctx.identity(x, ctx.node)
        return
    adjacent = picked == list(range(picked[0], picked[-1] + 1))
    n_index = len(so) - len(kept)
    if not any(_is_bool(indices[k]) for k in picked):
        # Integer indices put their broadcast shape where the dims they index were. A bool
        # mask of several dims looks like one integer index where the dtype is unknown (fx
        # shape records carry none): where the dims do not add up, couple nothing (frozen).
        try:
            expected = len(torch.broadcast_shapes(*[ctx.shape(indices[k]) for k in picked]))
        except RuntimeError:
            return
        if n_index != expected:
            return
    at = first if adjacent else 0
    if len(picked) == 1 and not _is_bool(indices[picked[0]]):
        yield from _addressed(ctx, x, picked[0], indices[picked[0]], result=False)
    for j, xd in enumerate(kept):
        od = j if j < at else j + n_index
        if 0 <= od < len(so) and sx[xd] == so[od]:
            yield Couple(ctx.space(x, xd), ctx.out(od))


def index_rows(ctx: CoupleContext, x: Any, indices: list[Any]) -> Iterator[Record]:
    """Graph units of ``x[indices]`` with one index tensor at dim ``d`` (ATen's index list):
    an integer index's entry k is the result's row k (its values address ``x``'s rows); a 1-D
    bool mask's entry j is ``x``'s row j, kept rows land in order."""
    picked = [k for k, t in enumerate(indices) if t is not None]
    sx, so = ctx.shape(x), ctx.out_shape
    if len(picked) != 1 or sx is None or so is None:
        return
    d, idx = picked[0], indices[picked[0]]
    si = ctx.shape(idx)
    if si is None or len(si) != 1 or len(so) != len(sx):
        return
    if not _is_bool(idx):
        yield from _rows(ctx, idx, ctx.node, 0, d)
        return
    mask = ctx.value(idx)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.numel() != sx[d]:
        return
    yield from _rows(ctx, idx, x, 0, d)
    pos = mask.nonzero().flatten().numpy()
    if pos.size == so[d]:
        yield Couple(ctx.space(x, d), ctx.out(d), pos, np.arange(pos.size))


def getitem_indices(ctx: CoupleContext, index: Any, ndim: int) -> Optional[list[Any]]:
    """``x[index]`` as ATen's index list when ``index`` holds tensors and otherwise only whole
    slices and one ``...`` (``x[idx]``, ``x[:, idx]``, ``x[..., idx]``); None for other mixes
    (ints, steps or ``None`` beside a tensor), which stay frozen."""
    items = list(index) if isinstance(index, (tuple, list)) else [index]
    if not any(isinstance(it, fx.Node) and ctx.shape(it) is not None for it in items):
        return None
    out: list[Any] = []
    for k, it in enumerate(items):
        if it is Ellipsis:  # a bool mask of k dims uses k of them
            used = sum(len(ctx.shape(j)) if _is_bool(j) else 1 for j in items
                       if j is not Ellipsis)
            out += [None] * (ndim - used)
        elif isinstance(it, slice) and it == slice(None):
            out.append(None)
        elif isinstance(it, fx.Node) and ctx.shape(it) is not None:
            out.append(it)
        else:
            return None
    while out and out[-1] is None:
        out.pop()
    return out


@register(*aten_ops("scatter_add.default", "scatter_add_.default", "scatter.src", "scatter_.src",
                "scatter.value", "scatter_.value", "scatter.reduce", "scatter_.reduce",
                "scatter.value_reduce", "scatter_.value_reduce", "scatter_reduce.two",
                "scatter_reduce_.two", "gather.default"),
          torch.scatter_add, torch.scatter, torch.scatter_reduce, torch.gather,
          "scatter_add", "scatter_add_", "scatter", "scatter_", "scatter_reduce",
          "scatter_reduce_", "gather")
class ScatterRule(OpRule):
    """``self.scatter_add_(dim, index, src)`` and the other scatters (``scatter``,
    ``scatter_reduce(..., reduce, include_self)``), and ``gather(self, dim, index)``.

    Scatter: the result is ``self`` with ``src[i][j]`` combined into row ``index[i][j]`` of
    column ``j`` (for ``dim=0``); ``gather`` reads ``self[index[i][j]][j]``. Along ``dim``
    the rows the index values address stay whole (``self`` and a scatter's result), and a
    gather's result follows ``index`` row for row; along every other dim ``d``,
    ``self``, ``index``, ``src`` and the result are one unit index for index when all have the
    same size there (a narrower ``index`` leaves ``d`` frozen).
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        node = ctx.node
        x, dim, index = _self(ctx), ctx.value(ctx.arg(1, "dim")), ctx.arg(2, "index")
        src = node_arg(node, 3, "src")
        if src is None:
            src = node_arg(node, 3, "value")
        sx, si, so = ctx.shape(x), ctx.shape(index), ctx.out_shape
        if sx is None or si is None or so is None or not isinstance(dim, int):
            return
        dim %= len(sx)
        gather = op_name(node.target) == "gather"
        operands = [a for a in (x, index, src) if ctx.shape(a) is not None]
        if any(len(ctx.shape(a)) != len(so) for a in operands):
            return
        if gather:
            yield from ctx.identity(index, node, [dim])
            yield from _addressed(ctx, x, dim, index, result=False)
        else:
            yield from _addressed(ctx, x, dim, index)
        for d in range(len(so)):
            if d != dim and all(ctx.shape(a)[d] == so[d] for a in operands):
                for a in operands:
                    yield Couple(ctx.space(a, d), ctx.out(d))

    def graph_couple(self, ctx: CoupleContext) -> Iterator[Record]:
        """Index entry i along ``dim`` is source entry i (an edge's message); a scatter's row r of
        ``self`` is the result's row r."""
        x, dim, index = _self(ctx), ctx.value(ctx.arg(1, "dim")), ctx.arg(2, "index")
        src = node_arg(ctx.node, 3, "src")
        if ctx.shape(x) is None or not isinstance(dim, int):
            return
        dim %= len(ctx.shape(x))
        if op_name(ctx.node.target) != "gather":
            yield from _rows(ctx, x, ctx.node, dim, dim)
            yield from _rows(ctx, index, src, dim, dim)


@register(*aten_ops("index_add.default", "index_add_.default", "index_copy.default",
                "index_copy_.default", "index_reduce.default", "index_reduce_.default",
                "index_fill.int_Scalar", "index_fill_.int_Scalar", "index_fill.int_Tensor",
                "index_fill_.int_Tensor"),
          torch.index_add, torch.index_copy, torch.index_reduce, torch.index_fill,
          "index_add", "index_add_", "index_copy", "index_copy_", "index_reduce",
          "index_reduce_", "index_fill", "index_fill_")
class IndexAddRule(OpRule):
    """``self.index_add_(dim, index, source)`` (and ``index_copy``, ``index_reduce``,
    ``index_fill``): row ``index[i]`` of ``self`` along ``dim`` combines slice ``i`` of
    ``source``. Along ``dim`` the rows the index addresses stay whole; every other dim of
    ``self``, ``source`` and the result is one unit index for index."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x, dim = _self(ctx), ctx.value(ctx.arg(1, "dim"))
        src = node_arg(ctx.node, 3, "source")
        sx, so = ctx.shape(x), ctx.out_shape
        if sx is None or so is None or not isinstance(dim, int):
            return
        dim %= len(sx)
        yield from _addressed(ctx, x, dim, ctx.arg(2, "index"))
        yield from ctx.identity(x, ctx.node, [d for d in range(len(so)) if d != dim])
        ss = ctx.shape(src)
        if ss is not None and len(ss) == len(so):
            yield from ctx.identity(src, ctx.node, [d for d in range(len(so))
                                                    if d != dim and ss[d] == so[d]])

    def graph_couple(self, ctx: CoupleContext) -> Iterator[Record]:
        """Index entry i is slice i of ``source`` along ``dim``; row r of ``self`` is the
        result's row r."""
        x, dim = _self(ctx), ctx.value(ctx.arg(1, "dim"))
        if ctx.shape(x) is None or not isinstance(dim, int):
            return
        dim %= len(ctx.shape(x))
        yield from _rows(ctx, x, ctx.node, dim, dim)
        yield from _rows(ctx, ctx.arg(2, "index"), node_arg(ctx.node, 3, "source"), 0, dim)
