"""``nn.EmbeddingBag`` and ``F.embedding_bag``: the embedding dim is prunable.

Every mode reduces each column of the bag's rows on its own (``sum``, ``mean``, ``max``; the
``per_sample_weights`` of ``sum`` scale whole rows; ``padding_idx`` rows are left out of every
column alike), so output column ``j`` is weight column ``j`` reduced: removing it is exact. With
``max_norm`` the rows looked up are renormalised (in place) by their norm over the embedding dim,
which a removed column would change: the dim is then frozen, with that reason. The bags (output
rows) map to the rows of a 2-D input; with ``offsets`` they are addressed by values and stay
whole, as do the vocabulary and the indices.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch.nn as nn
import torch.nn.functional as F

from ..rules import ApplyContext, Couple, CoupleContext, Freeze, OpRule, Record, Role, Space, \
    register

_MAX_NORM = "max_norm renormalises each looked-up row by its norm over the embedding dim"


def _couplings(ctx: CoupleContext, x: Any, weight: Space, max_norm: Any) -> Iterator[Record]:
    so, sx = ctx.out_shape, ctx.shape(x)
    if so is None:
        return
    yield Couple(ctx.out(-1), weight)
    yield Role(weight, "out")
    if max_norm is not None:
        yield Freeze(weight, _MAX_NORM)
    if sx is not None and len(sx) == 2 and len(so) == 2 and sx[0] == so[0]:
        yield Couple(ctx.space(x, 0), ctx.out(0))  # one bag per input row


@register(nn.EmbeddingBag)
class EmbeddingBagRule(OpRule):
    """``nn.EmbeddingBag(input, offsets, per_sample_weights)``: see the module docstring."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        yield from _couplings(ctx, ctx.arg(0, "input"), ctx.param("weight", 1),
                              ctx.module.max_norm)

    def update(self, actx: ApplyContext) -> None:
        actx.module.embedding_dim = actx.module.weight.shape[1]


@register(F.embedding_bag)
class FunctionalEmbeddingBagRule(OpRule):
    """``F.embedding_bag(input, weight, offsets, max_norm, ...)`` with the weight as a graph
    value."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        w = ctx.arg(1, "weight")
        sw = ctx.shape(w)
        if sw is None or len(sw) != 2:
            return
        yield from _couplings(ctx, ctx.arg(0, "input"), ctx.space(w, 1),
                              ctx.value(ctx.arg(3, "max_norm")))
