"""Linear layers, embeddings and matrix products (``@``, ``bmm``, ``einsum``).

Products sum over their contracted dim, so zeroing an index there contributes nothing and
removing it is exact: the contracted dims of both operands are one unit.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..rules import Couple, CoupleContext, OpRule, Record, Role, Space, head_dim_of, register


def linear_couplings(ctx: CoupleContext, x: Any, w_out: Space, w_in: Space,
                     bias: Optional[Space]) -> Iterator[Record]:
    sx = ctx.shape(x)
    if sx is None:
        return
    yield from ctx.identity(x, ctx.node, range(len(sx) - 1))
    yield Couple(ctx.space(x, -1), w_in)
    yield Couple(ctx.out(-1), w_out)
    yield Role(w_out, "out")
    yield Role(w_in, "in")
    if bias is not None:
        yield Couple(ctx.out(-1), bias)
        yield Role(bias, "bias")


@register(nn.Linear)
class LinearRule(OpRule):
    """``nn.Linear``: last output dim = weight rows (+ bias), last input dim = weight columns."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        bias = ctx.param("bias", 0) if ctx.module.bias is not None else None
        yield from linear_couplings(ctx, ctx.arg(0, "input"), ctx.param("weight", 0),
                                    ctx.param("weight", 1), bias)

    def update(self, actx: Any) -> None:
        m = actx.module
        m.out_features, m.in_features = m.weight.shape

    def macs(self, mctx: Any) -> int:
        return math.prod(mctx.shape(mctx.node)) * mctx.param_shape("weight")[1]


@register(F.linear)
class FunctionalLinearRule(OpRule):
    """``F.linear(x, weight, bias)`` with the weight (and bias) as graph values."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        w, b = ctx.arg(1, "weight"), ctx.arg(2, "bias")
        if ctx.shape(w) is None or len(ctx.shape(w)) != 2:
            return
        bias = ctx.space(b, 0) if ctx.shape(b) is not None else None
        yield from linear_couplings(ctx, ctx.arg(0, "input"), ctx.space(w, 0), ctx.space(w, 1),
                                    bias)

    def macs(self, mctx: Any) -> int:
        w = mctx.node.args[1] if len(mctx.node.args) > 1 else mctx.node.kwargs["weight"]
        return math.prod(mctx.shape(mctx.node)) * mctx.shape(w)[1]


@register(nn.Embedding)
class EmbeddingRule(OpRule):
    """``nn.Embedding``: the embedding dim = weight columns; the vocabulary stays whole."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        yield from ctx.identity(x, ctx.node, range(len(ctx.shape(x))))
        yield Couple(ctx.out(-1), ctx.param("weight", 1))
        yield Role(ctx.param("weight", 1), "out")

    def update(self, actx: Any) -> None:
        actx.module.embedding_dim = actx.module.weight.shape[1]


@register(F.embedding)
class FunctionalEmbeddingRule(OpRule):
    """``F.embedding(ids, weight)``."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
        yield from ctx.identity(x, ctx.node, range(len(ctx.shape(x))))
        yield Couple(ctx.out(-1), ctx.space(w, 1))


def _batch_dims(ctx: CoupleContext, operands: list[tuple[Any, int]], out: Any,
                out_batch: int) -> Iterator[Couple]:
    """Couple the leading (broadcast) batch dims of each operand to the output's."""
    so = ctx.shape(out)
    for a, nb in operands:
        sa = ctx.shape(a)
        shift = out_batch - nb
        for d in range(nb):
            if sa[d] == so[d + shift]:
                yield Couple(ctx.space(a, d), ctx.space(out, d + shift))


@register(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm")
class MatmulRule(OpRule):
    """``a @ b``: contracted dims of a and b are one unit; free dims map to the output."""

    def head_dims(self, node: fx.Node, shapes: dict[str, tuple[int, ...]]) -> list[Space]:
        """``q @ k.transpose(-2, -1)`` on ``(B, H, T, D)`` operands: dim -3 is the heads."""
        return head_dim_of(list(node.args[:2]), shapes) if len(node.args) == 2 else []

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
        sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.out_shape
        if sa is None or sb is None or so is None:
            return
        yield Couple(ctx.space(a, -1), ctx.space(b, -2 if len(sb) > 1 else 0))
        if len(sa) == 1 and len(sb) == 1:
            return
        if len(sa) == 1:
            yield Couple(ctx.space(b, -1), ctx.out(-1))
            yield from _batch_dims(ctx, [(b, len(sb) - 2)], ctx.node, len(so) - 1)
        elif len(sb) == 1:
            yield Couple(ctx.space(a, -2), ctx.out(-1))
            yield from _batch_dims(ctx, [(a, len(sa) - 2)], ctx.node, len(so) - 1)
        else:
            yield Couple(ctx.space(a, -2), ctx.out(-2))
            yield Couple(ctx.space(b, -1), ctx.out(-1))
            yield from _batch_dims(ctx, [(a, len(sa) - 2), (b, len(sb) - 2)], ctx.node,
                                   len(so) - 2)

    def macs(self, mctx: Any) -> int:
        a = mctx.node.args[0]
        return math.prod(mctx.shape(mctx.node) or (1,)) * mctx.shape(a)[-1]


@register(torch.einsum)
class EinsumRule(OpRule):
    """``torch.einsum``: every subscript letter is one unit across operands and output.

    Letters repeated within one operand (diagonals) and ``...`` are left frozen.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        eq = ctx.node.args[0]
        ops = ctx.node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = ops[0]
        if not isinstance(eq, str) or "..." in eq or "->" not in eq:
            return
        lhs, rhs = eq.replace(" ", "").split("->")
        terms = lhs.split(",")
        if len(terms) != len(ops):
            return
        where: dict[str, list[Space]] = {}
        sizes: dict[Space, int] = {}
        for term, op in zip(terms + [rhs], list(ops) + [ctx.node]):
            shape = ctx.shape(op)
            if shape is None or len(set(term)) != len(term) or len(term) != len(shape):
                return
            for d, letter in enumerate(term):
                sp = ctx.space(op, d)
                where.setdefault(letter, []).append(sp)
                sizes[sp] = shape[d]
        for spaces in where.values():
            full = max(sizes[s] for s in spaces)
            spaces = [s for s in spaces if sizes[s] == full]  # skip broadcast size-1 dims
            for s in spaces[1:]:
                yield Couple(spaces[0], s)

    def macs(self, mctx: Any) -> int:
        eq = mctx.node.args[0]
        letters: dict[str, int] = {}
        ops = mctx.node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = ops[0]
        for term, op in zip(eq.replace(" ", "").split("->")[0].split(","), ops):
            for letter, n in zip(term, mctx.shape(op) or ()):
                letters[letter] = max(letters.get(letter, 1), n)
        return math.prod(letters.values())
