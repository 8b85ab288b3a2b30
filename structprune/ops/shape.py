"""Shape ops: view/reshape/flatten, permute/transpose, cat/stack, split/chunk/unbind, indexing,
expand/repeat, and shape queries.

A reshape is matched block by block (runs of dims whose sizes multiply to the same number). A
block that maps one dim to one dim is an identity; a block that splits one dim into several
factors (``E -> (H, D)``, ``3E -> (3, H, D)``) or merges several into one ties the flat dim to
exactly one factor and freezes the others. Which factor is decided by the solver
(:class:`~structprune.graph.coupling.Choice`): the first one, in order, that nothing else
freezes. That is what makes attention heads and channel shuffles prunable with no special case.

Literal sizes in the graph (``x.view(B, 8, 3, 16)``) are fixed after slicing by evaluation: the
rule compares each size argument's value with the new expected shape and rewrites only those
that differ, so dynamic sizes (``x.size(0)``) stay dynamic.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..rules import (Address, Choice, Couple, CoupleContext, Freeze, OpRule, Record, SizeValue,
                     Space, _REGISTRY,
                     describe, op_name, register)
from .elementwise import touch

_REGROUP = "the reshape regroups several dims into several others; they stay whole"


def _blocks(sx: Sequence[int], so: Sequence[int]) -> Optional[list[tuple[list[int], list[int]]]]:
    ix = [d for d, n in enumerate(sx) if n != 1]
    io = [d for d, n in enumerate(so) if n != 1]
    blocks, i, j = [], 0, 0
    while i < len(ix) and j < len(io):
        bi, bj = [ix[i]], [io[j]]
        pa, pb = sx[ix[i]], so[io[j]]
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(ix):
                    return None
                pa *= sx[ix[i]]
                bi.append(ix[i])
            else:
                j += 1
                if j >= len(io):
                    return None
                pb *= so[io[j]]
                bj.append(io[j])
        blocks.append((bi, bj))
        i, j = i + 1, j + 1
    return blocks if i == len(ix) and j == len(io) else None


def _coords(sizes: list[int], k: int) -> np.ndarray:
    """Coordinate along factor ``k`` of every flat index of a row-major ``sizes`` block."""
    n = math.prod(sizes)
    stride = math.prod(sizes[k + 1:])
    return (np.arange(n) // stride) % sizes[k]


def reshape_couplings(flat_side: Any, multi_side: Any, flat_dim: int, dims: list[int],
                      shape: Sequence[int], ctx: CoupleContext) -> Choice:
    sizes = [shape[d] for d in dims]
    flat = ctx.space(flat_side, flat_dim)
    n = math.prod(sizes)
    options = []
    for k, d in enumerate(dims):
        factor = ctx.space(multi_side, d)
        recs: list[Record] = [Couple(flat, factor, np.arange(n), _coords(sizes, k))]
        recs += [Freeze(ctx.space(multi_side, e), "") for e in dims if e != d]
        options.append((factor, recs))
    return Choice(options[::-1] if ctx.inner_first else options)


def split_head_dim(sx: Sequence[int], so: Sequence[int]) -> Optional[tuple[str, int]]:
    """Where a reshape splits the last dim into ``(H, D)`` (or merges ``(H, D)`` back), both
    over 1 (``[N, H*D] <-> [N, H, D]``, GAT's heads): ``("out", d)`` or ``("in", d)`` for the
    ``H`` dim of the output or the input; None for any other reshape."""
    blocks = _blocks(sx, so)
    for bi, bj in blocks or []:
        if len(bi) == 1 and len(bj) == 2 and bi[0] == len(sx) - 1 and bj[1] == len(so) - 1 \
                and so[bj[0]] > 1 and so[bj[1]] > 1:
            return "out", bj[0]
        if len(bj) == 1 and len(bi) == 2 and bj[0] == len(so) - 1 and bi[1] == len(sx) - 1 \
                and sx[bi[0]] > 1 and sx[bi[1]] > 1:
            return "in", bi[0]
    return None


def view_couplings(ctx: CoupleContext, x: Any, out: Any) -> Iterator[Record]:
    sx, so = ctx.shape(x), ctx.shape(out)
    if sx is None or so is None:
        return
    blocks = _blocks(sx, so)
    if blocks is None:
        return
    for bi, bj in blocks:
        if len(bi) == 1 and len(bj) == 1:
            yield Couple(ctx.space(x, bi[0]), ctx.space(out, bj[0]))
        elif len(bi) == 1:
            yield reshape_couplings(x, out, bi[0], bj, so, ctx)
        elif len(bj) == 1:
            yield reshape_couplings(out, x, bj[0], bi, sx, ctx)
        else:
            for d in bi:
                yield Freeze(ctx.space(x, d), _REGROUP)


def fix_sizes(actx: Any, sizes: Sequence[Any], expected: Sequence[int]) -> list[Any]:
    """Size arguments with each literal or value that no longer matches replaced by the new size.

    A literal becomes the new size. A traced size (``B * 12`` in an export graph whose batch
    stays open) is scaled instead, ``B * 12 * new // old``, so it stays a function of the
    input sizes: the pruned dim is a factor of it (a batch times a head count)."""
    out = []
    for a, e in zip(sizes, expected):
        v = actx.value(a)
        if v == -1 or v == e:
            out.append(a)
        elif isinstance(a, fx.Node) and isinstance(v, int) and v > 0 and e > 0:
            g = math.gcd(int(e), v)
            if int(e) // g > 1:
                a = actx.emit(operator.mul, a, int(e) // g)
            out.append(actx.emit(operator.floordiv, a, v // g) if v // g > 1 else a)
        else:
            out.append(int(e))
    return out


def fixed_sizes(actx: Any, sizes: Sequence[Any], expected: Sequence[int]) -> Optional[list[Any]]:
    """:func:`fix_sizes`, or None when every size already matches (nothing to rewrite)."""
    out = fix_sizes(actx, sizes, expected)
    return None if all(a is b for a, b in zip(out, sizes)) else out


def fixed_size_arg(actx: Any, a: Any, expected: Sequence[int]) -> Any:
    """One size argument (a list/tuple of sizes, or a node holding a ``torch.Size``) fixed to
    ``expected``, or None when its value already matches.

    The check compares values, not the node's old and new shapes: a size read from a tensor of
    another group (``y.view(B, x.size(1))``) may change while this node's shape does not.
    """
    if isinstance(a, (list, tuple)):
        out = fixed_sizes(actx, a, expected)
        return None if out is None else type(a)(out)
    v = actx.value(a)
    if isinstance(v, (list, tuple)) and len(v) == len(expected) and all(
            x == -1 or x == e for x, e in zip(v, expected)):
        return None
    return tuple(int(e) for e in expected)


@register("view", "reshape", torch.reshape, "flatten", torch.flatten, nn.Flatten, "squeeze",
          "unsqueeze", torch.squeeze, torch.unsqueeze, "unflatten", torch.unflatten, nn.Unflatten,
          "view_as", "reshape_as", "ravel", torch.ravel)
class ReshapeRule(OpRule):
    """View-like ops: couple dims block by block (see the module docstring)."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        yield from view_couplings(ctx, x, ctx.node)
        if ctx.node.op != "call_module" and op_name(ctx.node.target) in ("view_as", "reshape_as"):
            yield from touch(ctx, ctx.arg(1, "other"))

    def head_dims(self, node: fx.Node, shapes: dict[str, tuple[int, ...]]) -> list[Space]:
        """The ``H`` of a reshape between ``[..., H*D]`` and ``[..., H, D]`` (multi-head
        layers such as GAT's write their heads this way)."""
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or x.name not in shapes or node.name not in shapes:
            return []
        where = split_head_dim(shapes[x.name], shapes[node.name])
        if where is None:
            return []
        return [Space.of_node(node if where[0] == "out" else x, where[1])]

    def size_args(self, node: fx.Node) -> set:
        """The sizes ``update`` rewrites: a view's/reshape's (after the tensor), unflatten's."""
        if node.op == "call_module":
            return set()
        name = op_name(node.target)
        if name in ("view", "reshape", "_unsafe_view"):
            return set(range(1, len(node.args)))
        return {2} if name == "unflatten" else set()

    def update(self, actx: Any) -> None:
        node, new = actx.node, actx.new_shape(actx.node)
        if new is None:
            return
        if isinstance(actx.module, nn.Unflatten):
            if new == actx.old_shape(node):
                return
            d = actx.module.dim % len(new)
            k = len(actx.module.unflattened_size)
            actx.module.unflattened_size = tuple(new[d:d + k])
            return
        if node.op == "call_module":  # nn.Flatten: no literal sizes
            return
        t = node.target
        name = op_name(t)
        if name in ("view", "reshape", "_unsafe_view"):  # (x, *sizes) or (x, sizes)
            rest = list(node.args[1:])
            if len(rest) == 1 and not isinstance(actx.value(rest[0]), int):
                fixed = fixed_size_arg(actx, rest[0], new)
                if fixed is not None:
                    node.args = (node.args[0], fixed)
            else:
                out = fixed_sizes(actx, rest, new)
                if out is not None:
                    node.args = (node.args[0], *out)
        elif name == "unflatten":
            dim = actx.value(node.args[1])
            sizes = node.args[2]
            d = dim % len(actx.old_shape(node.args[0]))
            out = fixed_sizes(actx, sizes, new[d:d + len(sizes)])
            if out is not None:
                node.args = (node.args[0], dim, tuple(out))


def _meta_perm(target: Any, is_method: bool, nd: int, args: tuple, kwargs: dict) -> Optional[list[int]]:
    """Which input dim each output dim of a pure dim-permuting op comes from."""
    primes = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37][:nd]
    if len(primes) < nd:
        return None
    t = torch.empty(primes, device="meta")
    try:
        if is_method:
            out = getattr(t, target)(*args, **kwargs)
        elif target is getattr:
            out = getattr(t, args[0])
        else:
            out = target(t, *args, **kwargs)
    except Exception:
        return None
    return [primes.index(n) for n in out.shape] if sorted(out.shape) == primes else None


@register("permute", torch.permute, "transpose", torch.transpose, "swapaxes", torch.swapaxes,
          "swapdims", torch.swapdims, "movedim", torch.movedim, "moveaxis", torch.moveaxis, "t",
          torch.t, "mT", "adjoint")
class PermuteRule(OpRule):
    """Dim permutations: output dim d is input dim ``perm[d]``."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        if sx is None:
            return
        args = tuple(ctx.value(a) for a in ctx.node.args[1:])
        kwargs = {k: ctx.value(v) for k, v in ctx.node.kwargs.items()}
        perm = _meta_perm(ctx.node.target, ctx.node.op == "call_method", len(sx), args, kwargs)
        if perm is None:
            return
        for d, src in enumerate(perm):
            yield Couple(ctx.space(x, src), ctx.out(d))


@register(getattr)
class GetAttrRule(OpRule):
    """``x.shape`` (a size tuple, followed like ``x.size()``; see :func:`size_value_freezes`),
    ``x.dtype`` (no coupling) and ``x.T``/``x.mT`` (a permutation)."""

    freezes_unmentioned = False

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x, attr = ctx.node.args[0], ctx.node.args[1]
        sx = ctx.shape(x)
        if attr == "shape" and sx is not None:  # a size tuple: see ShapeQueryRule
            yield from size_value_freezes(ctx, x, tuple(frozenset({d}) for d in range(len(sx))))
            return
        if ctx.out_shape is None or sx is None:
            return
        if attr in ("data",):
            yield from ctx.identity(x, ctx.node)
            return
        perm = _meta_perm(getattr, False, len(sx), (attr,), {})
        if perm is not None:
            for d, src in enumerate(perm):
                yield Couple(ctx.space(x, src), ctx.out(d))
        else:
            yield from ctx.freeze(x, f"attribute .{attr} is not supported")


# --- where a queried size goes ---------------------------------------------------------------
#
# A size read from a tensor (``x.size(1)``, ``x.shape[-1]``) may feed shape arguments: a view's
# sizes, a factory's size. Pruning the dim changes the size, the pruned op gets another shape,
# and the apply pass checks that shape against the plan and rewrites the literal where they
# differ (``fix_sizes``): exact. A size that becomes a value instead (``h.sum() / h.size(-1)``,
# attention's ``q.size(-1) ** -0.5``, a fill value, a comparison) changes that value, while the
# masked original keeps the full size: the dim must stay whole.
#
# A rule declares its size arguments with ``size_args(node)``: the positions (ints) and keyword
# names of the arguments that are sizes its ``update`` reconciles with the plan. Anything a size
# reaches that is not such an argument, after any pure scalar arithmetic, is a value use.

#: The dims a scalar depends on (a frozenset), or one such set per item of a size tuple.
SizeDeps = Any

#: Pure functions of Python scalars that a size may pass through (besides ``operator``,
#: ``math`` and builtins): the SymInt arithmetic of graphs captured by ``torch.export``.
_SCALAR_FUNCTIONS = tuple(getattr(torch, n) for n in (
    "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "_sym_sqrt",
    "sym_sum", "Size") if hasattr(torch, n))
_SCALAR_MODULES = ("_operator", "operator", "math", "builtins")


def _flat(deps: SizeDeps) -> frozenset:
    return frozenset().union(*deps) if isinstance(deps, tuple) else deps


def _is_tensor(ctx: CoupleContext, a: fx.Node) -> bool:
    return ctx.shape(a) is not None or ctx.item_shapes(a) is not None


def _scalar_step(ctx: CoupleContext, u: fx.Node, v: fx.Node, deps: SizeDeps) -> Optional[SizeDeps]:
    """If ``u`` is pure scalar arithmetic on ``v`` (no tensor in or out), the dims its value
    depends on; otherwise None (``u`` consumes the size)."""
    if _is_tensor(ctx, u) or any(_is_tensor(ctx, a) for a in u.all_input_nodes):
        return None
    if u.op == "call_function":
        t = u.target
        pure = getattr(t, "__module__", None) in _SCALAR_MODULES or any(
            t is f for f in _SCALAR_FUNCTIONS)
        if not pure or t in (operator.setitem, operator.delitem):
            return None
        if t is operator.getitem and u.args[0] is v and isinstance(deps, tuple):
            k = ctx.value(u.args[1])  # one item, or a slice, of a size tuple
            if isinstance(k, (int, slice)):
                try:
                    return deps[k]
                except IndexError:
                    return None
        return _flat(deps)
    if u.op == "call_method":  # a method of an int or a torch.Size: .numel(), .index(...)
        return _flat(deps)
    return None


def _contains(a: Any, v: fx.Node) -> bool:
    if a is v:
        return True
    if isinstance(a, (list, tuple)):
        return any(_contains(x, v) for x in a)
    if isinstance(a, dict):
        return any(_contains(x, v) for x in a.values())
    if isinstance(a, slice):
        return any(_contains(x, v) for x in (a.start, a.stop, a.step))
    return False


def _is_size_argument(u: fx.Node, v: fx.Node) -> bool:
    """Whether every place ``v`` appears in ``u``'s arguments is a size argument of u's rule."""
    if u.op == "call_function":
        try:
            rule = _REGISTRY.get(u.target)
        except TypeError:
            rule = None
    elif u.op == "call_method":
        rule = _REGISTRY.get(str(u.target))
    else:  # modules, the graph output
        return False
    size_args = getattr(rule, "size_args", None)
    if size_args is None:
        return False
    keys = size_args(u)
    return not any(_contains(a, v) and k not in keys for k, a in
                   [*enumerate(u.args), *u.kwargs.items()])


def size_value_freezes(ctx: CoupleContext, x: fx.Node, deps: SizeDeps) -> Iterator[Freeze]:
    """Freeze each dim of ``x`` whose size, as read by ``ctx.node``, reaches a value.

    ``deps`` are the dims ``ctx.node``'s value depends on (per item for a size tuple). Its users
    are followed through pure scalar arithmetic; every use that is not a size argument (see
    ``size_args``) freezes the dims it depends on. Unknown ops count as value uses.
    """
    why: dict[int, tuple[str, str]] = {}
    todo, seen = [(ctx.node, deps)], set()
    while todo:
        v, dv = todo.pop()
        for u in v.users:
            if (u, dv) in seen:
                continue
            seen.add((u, dv))
            du = _scalar_step(ctx, u, v, dv)
            if du is not None:
                todo.append((u, du))
            elif not _is_size_argument(u, v):
                for d in sorted(_flat(dv)):
                    why.setdefault(d, (f"the size of dim {d} of %{x.name} is used as a value by "
                                       f"{describe(u)} (%{u.name}): pruning the dim would change "
                                       f"that value", u.name))
    for d, (reason, consumer) in sorted(why.items()):
        yield SizeValue(ctx.space(x, d), reason, consumer=consumer)


#: What each query reads: ``"dim"`` (the one dim asked for, or all as a tuple), ``"all"`` (a
#: value of every size), ``None`` (metadata that pruning does not change).
_QUERIES = {"size": "dim", "sym_size": "dim", "len": "first", "numel": "all", "nelement": "all",
            "sym_numel": "all", "sym_stride": "all", "sym_storage_offset": "all",
            "is_contiguous": "all"}


@register("size", "dim", "numel", "nelement", "ndimension", "element_size", "get_device",
          "is_contiguous", "is_floating_point", torch.numel, len, torch.is_tensor,
          torch.is_floating_point)
class ShapeQueryRule(OpRule):
    """Queries of a tensor's metadata. A queried dim stays free while its size only feeds shape
    arguments (``x.view(B, x.size(1), -1)``: the apply pass rewrites them); where it is used as
    a value (``h.sum(-1) / h.size(-1)``, ``q.size(-1) ** -0.5``) the dim is frozen, since
    pruning it would change that value (see :func:`size_value_freezes`)."""

    freezes_unmentioned = False

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        kind = _QUERIES.get(op_name(ctx.node.target))
        if sx is None or kind is None or not sx:
            return
        if kind == "first":
            deps: SizeDeps = frozenset({0})
        elif kind == "all":
            deps = frozenset(range(len(sx)))
        else:
            d = ctx.value(ctx.arg(1, "dim"))
            deps = (tuple(frozenset({k}) for k in range(len(sx))) if d is None
                    else frozenset({d % len(sx)}))
        yield from size_value_freezes(ctx, x, deps)


_FACTORIES = ("new_zeros", "new_ones", "new_full", "new_empty")


@register(*_FACTORIES, torch.zeros, torch.ones, torch.empty)
class FactoryRule(OpRule):
    """``x.new_zeros(*size)``, ``new_ones``, ``new_full(size, value)``, ``new_empty`` and
    ``zeros``, ``ones``, ``empty``, ``full``: a constant the same at every index (or, for
    ``empty``, storage the program fills before it reads it: MFConv's per-degree
    ``index_copy_``), so no dim is tied to anything here (what it meets decides) and ``x`` is
    read only for its dtype; after pruning the size arguments follow the new shape (the zero
    state of an unrolled RNN, ``zeros(B, hidden)``)."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        yield from touch(ctx, ctx.node)
        if op_name(ctx.node.target) in _FACTORIES:
            yield from touch(ctx, ctx.arg(0, "self"))

    def size_args(self, node: fx.Node) -> set:
        """The sizes ``update`` rewrites: every argument but ``new_*``'s tensor and ``full``'s
        fill value."""
        name = op_name(node.target)
        first = 1 if name in _FACTORIES else 0
        if name in ("full", "new_full"):
            return {first, "size"}
        return {*range(first, len(node.args)), "size"}

    def update(self, actx: Any) -> None:
        node, new = actx.node, actx.new_shape(actx.node)
        if new is None:
            return
        name = op_name(node.target)
        first = 1 if name in _FACTORIES else 0  # new_*: after the tensor
        args = list(node.args)
        if "size" in node.kwargs:
            fixed = fixed_size_arg(actx, node.kwargs["size"], new)
            if fixed is not None:
                node.kwargs = {**node.kwargs, "size": fixed}
        elif len(args) > first and not isinstance(actx.value(args[first]), int):
            fixed = fixed_size_arg(actx, args[first], new)  # zeros((B, 12)), new_full(x.shape, v)
            if fixed is not None:
                args[first] = fixed
                node.args = tuple(args)
        elif name not in ("full", "new_full"):  # new_zeros(B, 12)
            out = fixed_sizes(actx, args[first:], new)
            if out is not None:
                node.args = tuple(args[:first]) + tuple(out)
        elif new != actx.old_shape(node):
            raise NotImplementedError("full() with sizes that are not one sequence")


@register(torch.arange)
class ArangeRule(OpRule):
    """``arange(n)``: its values are its positions (node ids, ``edge_index`` of self-loops), so
    its dim stays whole; frozen with that reason rather than as an op without a rule. As graph
    units, ``arange(x.size(d))`` counts the rows of ``x``'s dim ``d``: entry i is row i."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        if ctx.out_shape is not None and len(ctx.out_shape) == 1:
            yield Address(ctx.out(0), "arange's values are its positions: they stay whole")

    def graph_couple(self, ctx: CoupleContext) -> Iterator[Record]:
        so = ctx.out_shape
        args = [a for a in ctx.node.args if a is not None]
        if so is None or len(so) != 1 or not args or (len(args) > 1 and ctx.value(args[0]) != 0):
            return
        end = args[-1] if len(args) <= 2 else None
        src = size_source(end)
        if src is not None and ctx.shape(src[0]) is not None and ctx.shape(src[0])[src[1]] == so[0]:
            yield Couple(ctx.out(0), ctx.space(src[0], src[1]))


def size_source(a: Any) -> Optional[tuple[fx.Node, int]]:
    """``(x, d)`` when node ``a`` is the size of dim ``d`` of tensor node ``x`` (``x.size(d)``,
    ``aten.sym_size.int(x, d)``, ``x.shape[d]``), else None."""
    if not isinstance(a, fx.Node):
        return None
    name = op_name(a.target) if a.op in ("call_function", "call_method") else ""
    if name in ("size", "sym_size") and len(a.args) == 2 and isinstance(a.args[1], int):
        return (a.args[0], a.args[1]) if isinstance(a.args[0], fx.Node) else None
    if a.target is operator.getitem and isinstance(a.args[1], int):
        base = a.args[0]
        if (isinstance(base, fx.Node) and (
                (base.op == "call_method" and base.target == "size" and len(base.args) == 1)
                or (base.target is getattr and base.args[1] == "shape"))
                and isinstance(base.args[0], fx.Node)):
            return base.args[0], a.args[1]
    return None


@register(torch.cat, torch.concat, torch.concatenate)
class CatRule(OpRule):
    """``torch.cat(xs, dim)``: input i's index k is output index ``offset_i + k``."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        xs = ctx.arg(0, "tensors")
        so = ctx.out_shape
        if not isinstance(xs, (list, tuple)) or so is None:
            return
        dim = ctx.value(ctx.arg(1, "dim", 0)) % len(so)
        off = 0
        for a in xs:
            sa = ctx.shape(a)
            if sa is not None and tuple(sa) == (0,) and len(so) != 1:
                continue  # cat skips a 1-D empty tensor (an empty cache's first update)
            if sa is None or len(sa) != len(so):
                return
            yield from ctx.identity(a, ctx.node, [d for d in range(len(so)) if d != dim])
            yield Couple(ctx.space(a, dim), ctx.out(dim), np.arange(sa[dim]),
                         off + np.arange(sa[dim]))
            off += sa[dim]


@register(torch.stack)
class StackRule(OpRule):
    """``torch.stack(xs, dim)``: the new dim stays whole, the others map across inputs."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        xs = ctx.arg(0, "tensors")
        so = ctx.out_shape
        if not isinstance(xs, (list, tuple)) or so is None:
            return
        dim = ctx.value(ctx.arg(1, "dim", 0)) % len(so)
        for a in xs:
            sa = ctx.shape(a)
            if sa is None:
                return
            for d in range(len(sa)):
                yield Couple(ctx.space(a, d), ctx.out(d if d < dim else d + 1))


@register("split", torch.split, "chunk", torch.chunk, "unbind", torch.unbind,
          "tensor_split", torch.tensor_split)
class SplitRule(OpRule):
    """``split``/``chunk``/``unbind``: item k's index j is input index ``offset_k + j``.

    Chunks may lose different numbers of channels, so after pruning ``chunk`` is rewritten as
    ``split`` with explicit sizes. ``unbind`` removes its dim, which therefore stays whole.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        items = ctx.item_shapes(ctx.node)
        if sx is None or items is None:
            return
        name = op_name(ctx.node.target)
        default = 0
        dim = ctx.value(ctx.arg(1 if name == "unbind" else 2, "dim", default)) % len(sx)
        off = 0
        for k, s in enumerate(items):
            if s is None:
                return
            if name == "unbind":
                for d in range(len(sx)):
                    if d != dim:
                        yield Couple(ctx.space(x, d), ctx.item(k, d if d < dim else d - 1))
                continue
            for d in range(len(sx)):
                if d != dim:
                    yield Couple(ctx.space(x, d), ctx.item(k, d))
            yield Couple(ctx.space(x, dim), ctx.item(k, dim), off + np.arange(s[dim]),
                         np.arange(s[dim]))
            off += s[dim]

    def size_args(self, node: fx.Node) -> set:
        """``split``'s sizes, which ``update`` replaces by the pruned ones (a ``chunk`` count
        and ``tensor_split``'s indices are not sizes)."""
        if op_name(node.target) in ("split", "split_with_sizes"):
            return {1, "split_size_or_sections", "split_size", "split_sizes"}
        return set()

    def update(self, actx: Any) -> None:
        node = actx.node
        name = op_name(node.target)
        if name == "unbind":
            return
        x = node.args[0]
        sx = actx.old_shape(x)
        if sx is None:  # no shape recorded: couple() related nothing, so nothing changes
            return
        dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = actx.value(dim_arg) % len(sx)
        old = [s[dim] for s in actx.old_items(node)]
        new = [s[dim] for s in actx.new_items(node)]
        if name in ("split", "split_with_sizes"):  # sizes may be read from another tensor
            size_arg = node.args[1] if len(node.args) > 1 else next(
                (node.kwargs[k] for k in self.size_args(node) if k in node.kwargs), None)
            length = actx.new_shape(x)[dim]
            if _sections(actx.value(size_arg), length) == new:
                return
        elif old == new:
            return
        if name == "tensor_split":
            raise NotImplementedError("tensor_split with pruned sections")
        if isinstance(node.target, torch._ops.OpOverload):
            node.target = torch.ops.aten.split_with_sizes.default
        else:
            node.target = "split" if node.op == "call_method" else torch.split
        node.args = (x, new, dim)
        node.kwargs = {}


def _sections(size: Any, length: int) -> Optional[list[int]]:
    """The item sizes of ``split(x, size)`` along a dim of ``length``."""
    if isinstance(size, int) and size > 0:
        return [min(size, length - k) for k in range(0, length, size)]
    return list(size) if isinstance(size, (list, tuple)) else None


def _index_items(index: Any) -> Optional[list[Any]]:
    return list(index) if isinstance(index, tuple) else [index]


@register(operator.getitem)
class GetItemRule(OpRule):
    """Indexing: tuple items, and tensors indexed by ints, unit-step slices, ``None`` and ``...``.

    Indices a slice leaves out are coupled to nothing here, so they are removable (nothing reads
    them); an int index pins its one index. Tensor indices (``x[edge_index[0]]``) gather along
    the dims they index and map the others through (``scatter.index_couplings``); other
    index kinds (steps, and ints or ``None`` beside a tensor) freeze the dim.

    A slice bound read from a tensor's size (``self.pos[:, :x.shape[1]]``, ``x[:, :n]`` with
    ``n = x.size(1)``) stays symbolic: see :func:`traced_slice_couplings`.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        src, index = ctx.node.args[0], ctx.node.args[1]
        if isinstance(src, fx.Node) and isinstance(ctx.record(src), (list, dict)):
            yield from ctx.take_item(src, ctx.value(index))  # a tensor, or a container again
            return
        sx = ctx.shape(src)
        if sx is None or ctx.out_shape is None:
            return
        if _has_tensor(ctx, index):  # advanced indexing (a gather): see ops/scatter.py
            from .scatter import getitem_indices, index_couplings

            indices = getitem_indices(ctx, index, len(sx))
            if indices is not None:
                yield from index_couplings(ctx, src, indices)
            return
        raw = _index_items(index)
        plan = _index_plan(_resolved(ctx, index), sx)
        if plan is None:
            return
        pos = _positions(raw, len(sx))
        for kind, in_d, out_d, val in plan:
            item = raw[pos[in_d]] if in_d in pos else None
            if isinstance(item, slice) and _traced(item):
                yield from traced_slice_couplings(ctx, src, in_d, out_d, item)
            elif kind == "all":
                yield Couple(ctx.space(src, in_d), ctx.out(out_d))
            elif kind == "int":
                yield Freeze(ctx.space(src, in_d), "", idx=[val])
            elif kind == "slice":
                start, stop = val
                yield Couple(ctx.space(src, in_d), ctx.out(out_d), np.arange(start, stop),
                             np.arange(stop - start))

    def size_args(self, node: fx.Node) -> set:
        """The index, where every value in it read from the graph is a slice bound that is a
        tensor's size itself (``x[:, :y.size(1)]``): :func:`traced_slice_couplings` ties the
        sliced dim to that size's dim, or freezes both."""
        if len(node.args) < 2 or not _sized_slices_only(node.args[1]):
            return set()
        return {1}

    def graph_couple(self, ctx: CoupleContext) -> Iterator[Record]:
        """Graph units of a gather by a tensor index (see ``scatter.index_rows``)."""
        src, index = ctx.node.args[0], ctx.node.args[1]
        sx = ctx.shape(src)
        if sx is not None and ctx.out_shape is not None and _has_tensor(ctx, index):
            from .scatter import getitem_indices, index_rows

            indices = getitem_indices(ctx, index, len(sx))
            if indices is not None:
                yield from index_rows(ctx, src, indices)

    def update(self, actx: Any) -> None:
        node = actx.node
        src, index = node.args[0], node.args[1]
        if not isinstance(src, fx.Node) or actx.old_items(src) is not None:
            return
        sx = actx.old_shape(src)
        items_raw = index if isinstance(index, (tuple, list)) else [index]
        if sx is None or any(isinstance(it, fx.Node) and actx.old_shape(it) is not None
                             for it in items_raw):
            return
        value = _resolved(actx, index)
        plan = _index_plan(value, sx)
        if plan is None:
            return
        raw = _index_items(index)
        items = list(raw) if not isinstance(index, fx.Node) else _index_items(value)
        pos = _positions(items, len(sx))
        changed = False
        for kind, in_d, _, val in plan:
            dropped = actx.dropped(actx.space(src, in_d))
            if not len(dropped) or kind == "all":
                continue
            k = pos[in_d]
            if isinstance(items[k], slice) and _traced(items[k]):
                continue  # the bound is the pruned size itself (traced_slice_couplings)
            if kind == "int":
                items[k] = val - int(np.sum(dropped < val))
            else:
                start, stop = val
                new_start = start - int(np.sum(dropped < start))
                kept = (stop - start) - int(np.sum((dropped >= start) & (dropped < stop)))
                items[k] = slice(new_start, new_start + kept, None)
            changed = True
        if changed:
            node.args = (src, tuple(items) if isinstance(value, tuple) else items[0])


def _traced(item: slice) -> bool:
    """Whether a slice has a bound (or step) computed in the graph."""
    return any(isinstance(b, fx.Node) for b in (item.start, item.stop, item.step))


def _resolved(ctx: Any, index: Any) -> Any:
    """``index`` with every graph value replaced by its value in the run (slices included)."""
    if isinstance(index, slice):
        return slice(ctx.value(index.start), ctx.value(index.stop), ctx.value(index.step))
    if isinstance(index, tuple):
        return tuple(_resolved(ctx, it) for it in index)
    return ctx.value(index)


def _sized_slices_only(index: Any) -> bool:
    """Every graph value in ``index`` is the stop of a unit-step slice starting at 0 (or None)
    and is a tensor's size itself (``x.size(1)``, ``x.shape[1]``, ``aten.sym_size.int(x, 1)``)."""
    items = list(index) if isinstance(index, (tuple, list)) else [index]
    found = False
    for it in items:
        if isinstance(it, fx.Node):
            return False
        if isinstance(it, slice) and _traced(it):
            if isinstance(it.start, fx.Node) or isinstance(it.step, fx.Node) \
                    or it.start not in (None, 0) or it.step not in (None, 1) \
                    or size_source(it.stop) is None:
                return False
            found = True
    return found


def traced_slice_couplings(ctx: CoupleContext, x: Any, in_d: int, out_d: int,
                           item: Any, stop: Any = None, start: Any = None) -> Iterator[Record]:
    """The couplings of a unit-step slice of ``x``'s dim ``in_d`` whose bound is read from the
    graph (``pos[:, :x.size(1)]``; a ``slice`` ``item``, or ``start``/``stop`` of
    ``aten.slice``), producing the output's dim ``out_d``.

    The bound stays symbolic, so another input size reads another range of ``x``. Where the
    slice starts at 0 and stops at the size of dim ``D`` of a tensor ``y`` itself, the output
    dim is ``y``'s dim ``D`` index for index: pruning either prunes both, and the pruned bound
    (``y``'s new size) stops at the kept entries. ``x``'s entries beyond the bound stay whole
    (another size reads them). Any other computed bound leaves ``x``'s dim and the size's dim
    whole, with that reason.
    """
    if item is not None:
        start, stop, step = item.start, item.stop, item.step
    else:
        step = 1
    sx = ctx.shape(x)
    n = sx[in_d]
    src = size_source(stop)
    v_start, v_stop, v_step = ctx.value(start), ctx.value(stop), ctx.value(step)
    bound = stop.name if isinstance(stop, fx.Node) else None
    follows = (src is not None and not isinstance(start, fx.Node) and start in (None, 0)
               and v_step in (None, 1) and ctx.shape(src[0]) is not None
               and isinstance(v_stop, int) and 0 <= v_stop <= n
               and ctx.shape(src[0])[src[1]] == v_stop and ctx.out_shape[out_d] == v_stop)
    if follows:
        y, dim = src
        yield Couple(ctx.space(x, in_d), ctx.out(out_d), np.arange(v_stop), np.arange(v_stop))
        yield Couple(ctx.out(out_d), ctx.space(y, dim))
        if v_stop < n:
            yield Freeze(ctx.space(x, in_d), f"sliced to the size of dim {dim % len(ctx.shape(y))} "
                         f"of %{y.name} (%{bound}): another size reads these entries",
                         idx=np.arange(v_stop, n))
        return
    why = (f"sliced at a bound computed in the graph (%{bound or ctx.node.name}): another input "
           f"size reads other entries, and pruning would move the bound")
    yield Freeze(ctx.space(x, in_d), why)
    if src is not None and ctx.shape(src[0]) is not None:
        yield Freeze(ctx.space(src[0], src[1]), why)


def _has_tensor(ctx: CoupleContext, index: Any) -> bool:
    items = index if isinstance(index, (tuple, list)) else [index]
    return any(isinstance(it, fx.Node) and (ctx.shape(it) is not None
                                            or ctx.item_shapes(it) is not None) for it in items)


def _positions(items: list[Any], ndim: int) -> dict[int, int]:
    """Map input dim -> position in the index tuple (for ints and slices)."""
    n_ell = ndim - sum(1 for it in items if it is not None and it is not Ellipsis)
    out, d = {}, 0
    for k, it in enumerate(items):
        if it is None:
            continue
        if it is Ellipsis:
            d += n_ell
            continue
        out[d] = k
        d += 1
    return out


def _index_plan(index: Any, sx: Sequence[int]) -> Optional[list[tuple[str, int, int, Any]]]:
    items = _index_items(index)
    consuming = [it for it in items if isinstance(it, (int, slice))]
    if any(not (it is None or it is Ellipsis or isinstance(it, (int, slice))) for it in items):
        return None
    if sum(1 for it in items if it is Ellipsis) > 1:
        return None
    n_ell = len(sx) - len(consuming)
    plan, in_d, out_d = [], 0, 0
    for it in items:
        if it is None:
            out_d += 1
        elif it is Ellipsis:
            for _ in range(n_ell):
                plan.append(("all", in_d, out_d, None))
                in_d, out_d = in_d + 1, out_d + 1
        elif isinstance(it, int):
            plan.append(("int", in_d, -1, it % sx[in_d]))
            in_d += 1
        else:
            start, stop, step = it.indices(sx[in_d])
            if step != 1:
                return None
            if (start, stop) == (0, sx[in_d]):
                plan.append(("all", in_d, out_d, None))
            else:
                plan.append(("slice", in_d, out_d, (start, max(stop, start))))
            in_d, out_d = in_d + 1, out_d + 1
    while in_d < len(sx):
        plan.append(("all", in_d, out_d, None))
        in_d, out_d = in_d + 1, out_d + 1
    return plan


@register("expand", "expand_as", torch.broadcast_to, "broadcast_to")
class ExpandRule(OpRule):
    """``expand``: dims that keep their size map to the output; a stretched dim (from size 1, or
    a new leading one) repeats one value, so it is free: whatever it meets decides, and
    ``update`` writes the new size (a literal; a size read from another tensor stays as it is).

    For ``expand_as(other)`` the output's sizes come from ``other``, so other's dims are tied to
    the output's as well.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        from .elementwise import broadcast

        x = ctx.arg(0, "input")
        yield from broadcast(ctx, [x], ctx.node)
        if op_name(ctx.node.target) == "expand_as":
            yield from ctx.identity(ctx.arg(1, "other"), ctx.node)
        sx, so = ctx.shape(x), ctx.out_shape
        if sx is not None and so is not None:  # stretched dims repeat one value: free
            shift = len(so) - len(sx)
            for d in range(len(so)):
                if d < shift or (sx[d - shift] == 1 and so[d] != 1):
                    yield Couple(ctx.out(d), ctx.out(d))

    def size_args(self, node: fx.Node) -> set:
        """The sizes ``update`` rewrites (``expand``'s, ``broadcast_to``'s)."""
        if op_name(node.target) == "expand_as":
            return set()
        if isinstance(node.target, torch._ops.OpOverload):  # aten.expand(x, size, implicit)
            return {1, "size"}
        return {*range(1, len(node.args)), "size"}

    def update(self, actx: Any) -> None:
        node, new = actx.node, actx.new_shape(actx.node)
        if op_name(node.target) == "expand_as" or new is None:
            return
        if "size" in node.kwargs:  # broadcast_to(x, size=...)
            fixed = fixed_size_arg(actx, node.kwargs["size"], new)
            if fixed is not None:
                node.kwargs = {**node.kwargs, "size": fixed}
            return
        # aten.expand(x, size, implicit=False) takes the sizes as one list
        rest = list(node.args[1:2] if isinstance(node.target, torch._ops.OpOverload)
                    else node.args[1:])
        if len(rest) == 1 and not isinstance(actx.value(rest[0]), int):
            fixed = fixed_size_arg(actx, rest[0], new)
            if fixed is not None:
                node.args = (node.args[0], fixed, *node.args[2:])
        else:
            out = fixed_sizes(actx, rest, new)
            if out is not None:
                node.args = (node.args[0], *out)


@register("repeat", torch.tile, "tile", torch.repeat_interleave, "repeat_interleave")
class RepeatRule(OpRule):
    """``x.repeat(*counts)`` / ``torch.tile(x, counts)`` and ``x.repeat_interleave(k, dim)``.

    ``repeat`` lays ``k`` copies of a dim of size ``n`` one after the other: output index
    ``c*n + i`` is input index ``i`` for every copy ``c``, so removing unit ``i`` removes it from
    every copy and the pruned result is the kept entries repeated ``k`` times, in the same
    layout (the count is unchanged). ``repeat_interleave(k, dim)`` repeats each entry in
    place: output indices ``i*k .. i*k+k-1`` are input index ``i``. A dim of size 1 repeated,
    and the new leading dims ``repeat``/``tile`` add, hold copies of one value: free, as
    ``expand``'s stretched dims, with their count rewritten where they lose entries.
    ``repeat_interleave`` with a tensor of repeats is coupled only when every count is the
    same (then it is rewritten as that int where the dim loses entries); other tensors, and
    ``dim=None`` (the flattened tensor), leave the dims frozen.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx, so = ctx.shape(x), ctx.out_shape
        if sx is None or so is None:
            return
        if op_name(ctx.node.target) == "repeat_interleave":
            yield from self._interleave(ctx, x, sx, so)
            return
        shift = len(so) - len(sx)
        if shift < 0:
            return
        for d in range(shift):  # new leading dims: copies of the whole input
            yield Couple(ctx.out(d), ctx.out(d))
        for d, n in enumerate(sx):
            m = so[d + shift]
            if m == n:
                yield Couple(ctx.space(x, d), ctx.out(d + shift))
            elif n == 1:  # copies of one value: free, the count follows (update)
                yield Couple(ctx.out(d + shift), ctx.out(d + shift))
            elif n and m % n == 0:
                yield Couple(ctx.space(x, d), ctx.out(d + shift), np.tile(np.arange(n), m // n),
                             np.arange(m))

    def _interleave(self, ctx: CoupleContext, x: Any, sx: tuple, so: tuple) -> Iterator[Record]:
        dim = ctx.value(ctx.arg(2, "dim"))
        if not isinstance(dim, int) or len(so) != len(sx):
            yield from ctx.freeze(x, "repeat_interleave without a dim repeats the flattened "
                                     "tensor: its dims stay whole")
            return
        dim %= len(sx)
        k = _uniform_repeats(constant_value(ctx.arg(1, "repeats")), sx[dim])
        yield from ctx.identity(x, ctx.node, [d for d in range(len(sx)) if d != dim])
        if k is not None and so[dim] == k * sx[dim]:
            yield Couple(ctx.space(x, dim), ctx.out(dim), np.repeat(np.arange(sx[dim]), k),
                         np.arange(so[dim]))
        else:
            yield Freeze(ctx.space(x, dim), "repeat_interleave repeats the entries of this dim "
                         "by different (or computed) counts: removing one would move the rest")

    def update(self, actx: Any) -> None:
        node = actx.node
        x = node.args[0]
        old, new = actx.old_shape(x), actx.new_shape(x)
        out_old, out_new = actx.old_shape(node), actx.new_shape(node)
        if old is None or out_new is None or (old == new and out_old == out_new):
            return
        if op_name(node.target) == "repeat_interleave":
            self._update_interleave(actx, node, old, new)
            return
        shift = len(out_new) - len(new)
        counts = [out_new[d] if d < shift else out_new[d] // max(new[d - shift], 1)
                  for d in range(len(out_new))]
        rest = list(node.args[1:2] if isinstance(node.target, torch._ops.OpOverload)
                    or op_name(node.target) == "tile" else node.args[1:])
        if "dims" in node.kwargs or "repeats" in node.kwargs:
            key = "dims" if "dims" in node.kwargs else "repeats"
            rest = [node.kwargs[key]]
        seq = len(rest) == 1 and not isinstance(actx.value(rest[0]), int)
        given = list(actx.value(rest[0])) if seq else list(actx.value(rest))
        lead = [1] * (len(counts) - len(given))  # tile pads short counts with ones
        if lead + given == counts:
            return
        if any(isinstance(a, fx.Node) for a in ([rest[0]] if seq else rest)) or (
                seq and any(isinstance(a, fx.Node) for a in rest[0])):
            raise NotImplementedError("a repeat count read from the graph would change")
        counts = counts[len(lead):] if lead and counts[:len(lead)] == lead else counts
        if "dims" in node.kwargs or "repeats" in node.kwargs:
            node.kwargs = {**node.kwargs, key: tuple(counts)}
        elif seq:
            node.args = (x, type(rest[0])(counts), *node.args[2:])
        else:
            node.args = (x, *counts)

    def _update_interleave(self, actx: Any, node: fx.Node, old: tuple, new: tuple) -> None:
        dim = actx.value(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim"))
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        if not isinstance(reps, fx.Node) or old[dim % len(old)] == new[dim % len(new)]:
            return  # an int count is unchanged
        k = _uniform_repeats(constant_value(reps), old[dim % len(old)])
        if k is None:
            raise NotImplementedError("repeat_interleave with per-entry repeats")
        if isinstance(node.target, torch._ops.OpOverload):
            node.target = torch.ops.aten.repeat_interleave.self_int
        args = list(node.args)
        if len(args) > 1:
            args[1] = k
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, "repeats": k}


#: Ops that pass a constant tensor through unchanged (``torch.export`` lifts a literal tensor
#: and copies it: ``detach_(lift_fresh_copy(c_lifted_tensor_0))``).
_COPIES = ("lift_fresh_copy", "detach", "detach_", "clone", "alias", "_to_copy", "to",
           "contiguous")


def constant_value(a: Any) -> Any:
    """The value of ``a`` when it is a Python value, or a tensor the graph holds as a constant
    (a ``get_attr`` node, through copies); None for anything computed."""
    for _ in range(8):
        if not isinstance(a, fx.Node):
            return a
        if a.op == "get_attr":
            obj: Any = a.graph.owning_module
            for part in str(a.target).split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, torch.Tensor) else None
        if a.op in ("call_function", "call_method") and op_name(a.target) in _COPIES \
                and a.args and isinstance(a.args[0], fx.Node):
            a = a.args[0]
            continue
        return None
    return None


def _uniform_repeats(reps: Any, n: int) -> Optional[int]:
    """The one count of ``repeat_interleave``'s ``repeats`` when it is an int, or a tensor of
    one value (a single entry, or ``n`` equal ones); None for per-entry counts."""
    if isinstance(reps, int):
        return reps
    if isinstance(reps, torch.Tensor) and reps.dim() <= 1 and reps.numel() in (1, n) \
            and not reps.is_floating_point() and reps.device.type != "meta":
        vals = reps.flatten()
        if bool((vals == vals[0]).all()):
            return int(vals[0])
    return None
