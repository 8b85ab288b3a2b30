"""Recurrent cells: ``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell`` and their ATen ops.

A cell with hidden size H stacks its G gates in the rows of its weights (RNN: 1, GRU: 3 ``r, z,
n``, LSTM: 4 ``i, f, g, o``): hidden unit ``j`` owns rows ``g*H + j`` of ``w_ih``, ``w_hh``
and the biases, column ``j`` of ``w_hh``, and entry ``j`` of the state(s) in and out. Every
gate of unit ``j`` reads the previous state only through column ``j`` of ``w_hh``, and writes
only entry ``j`` of the new state, so removing the unit (all of it at once) is exact: the
other units see a zero where it was, which is what the masked original gives them. The input
features map to the columns of ``w_ih``. GatedGraphConv runs a ``GRUCell`` per layer.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch.nn as nn

from ..rules import (ApplyContext, Couple, CoupleContext, Freeze, OpRule, Record, Space, aten_ops,
                     register)


_GATES = {nn.RNNCell: 1, nn.GRUCell: 3, nn.LSTMCell: 4}


_OP_GATES = {op: g for name, g in (("rnn_tanh_cell.default", 1), ("rnn_relu_cell.default", 1),
                                   ("gru_cell.default", 3), ("lstm_cell.default", 4))
             for op in aten_ops(name)}


def cell_couplings(ctx: CoupleContext, x: Any, states: list[Space], outs: list[Space],
                   w_ih: Space, w_hh: Space, biases: list[Space], gates: int,
                   hidden: int) -> Iterator[Record]:
    """Hidden unit ``j``: the states' entry ``j``, rows ``g*H + j`` of the weights and biases,
    column ``j`` of ``w_hh``; the input's last dim is ``w_ih``'s columns."""
    unit = np.tile(np.arange(hidden), gates)
    rows = np.arange(gates * hidden)
    w_hh_in = w_hh.with_dim(1)
    for s in states + outs:
        yield Couple(s, w_hh_in)
    for s in [w_ih, w_hh] + biases:
        yield Couple(w_hh_in, s, unit, rows)
    sx = ctx.shape(x)
    if sx is not None:
        yield Couple(ctx.space(x, -1), w_ih.with_dim(1))


def _batch(ctx: CoupleContext, x: Any, outs: list[Space], states: list[Space]) -> Iterator[Record]:
    """A batched call: the batch dim maps through the states and outputs."""
    sx = ctx.shape(x)
    if sx is None or len(sx) != 2:
        return
    for s in states + outs:
        yield Couple(ctx.space(x, 0), s.with_dim(0))


@register(nn.RNNCell, nn.GRUCell, nn.LSTMCell)
class CellRule(OpRule):
    """``cell(input, hx)``: see the module docstring. ``hx`` may be omitted (zeros), and is
    ``(h, c)`` for an LSTM cell, whose output is ``(h', c')``."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        m = ctx.module
        gates = next(g for cls, g in _GATES.items() if isinstance(m, cls))
        x, hx = ctx.arg(0, "input"), ctx.arg(1, "hx")
        lstm = gates == 4
        states = _state_spaces(ctx, hx)
        outs = ([ctx.item(0, -1), ctx.item(1, -1)] if lstm else [ctx.out(-1)])
        biases = [ctx.param(b, 0) for b in ("bias_ih", "bias_hh") if ctx.has_param(b)]
        yield from cell_couplings(ctx, x, states, outs, ctx.param("weight_ih", 0),
                                  ctx.param("weight_hh", 0), biases,
                                  gates, m.hidden_size)
        yield from _batch(ctx, x, outs, states)

    def update(self, actx: ApplyContext) -> None:
        m = actx.module
        m.hidden_size = m.weight_hh.shape[1]
        m.input_size = m.weight_ih.shape[1]


@register(*_OP_GATES)
class AtenCellRule(OpRule):
    """``aten.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)`` and the RNN/LSTM cell ops, with
    the weights as graph values (graphs captured by ``torch.export``)."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        gates = _OP_GATES[ctx.node.target]
        lstm = gates == 4
        x, hx = ctx.arg(0, "input"), ctx.arg(1, "hx")
        w_ih, w_hh = ctx.arg(2, "w_ih"), ctx.arg(3, "w_hh")
        sw = ctx.shape(w_hh)
        if ctx.shape(w_ih) is None or sw is None or len(sw) != 2:
            return
        states = _state_spaces(ctx, hx)
        outs = [ctx.item(0, -1), ctx.item(1, -1)] if lstm else [ctx.out(-1)]
        biases = [ctx.space(b, 0) for b in (ctx.arg(4, "b_ih"), ctx.arg(5, "b_hh"))
                  if ctx.shape(b) is not None]
        yield from cell_couplings(ctx, x, states, outs, ctx.space(w_ih, 0), ctx.space(w_hh, 0),
                                  biases, gates, sw[1])
        yield from _batch(ctx, x, outs, states)


def _state_spaces(ctx: CoupleContext, hx: Any) -> list[Space]:
    """The last dim of the state input(s): ``hx``, or ``h`` and ``c`` (a tuple/list node or a
    list of two nodes); none when the state is omitted."""
    if hx is None:
        return []
    if isinstance(hx, (list, tuple)):
        return [ctx.space(h, -1) for h in hx if ctx.shape(h) is not None]
    if ctx.shape(hx) is not None:
        return [ctx.space(hx, -1)]
    items: Optional[list] = ctx.item_shapes(hx)
    if items:
        return [Space.item(hx.name, k, len(s) - 1) for k, s in enumerate(items) if s is not None]
    return []


@register(*aten_ops("lstm.input", "gru.input", "rnn_tanh.input", "rnn_relu.input"))
class AtenRNNInputRule(OpRule):
    """``aten.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
    batch_first)`` and the GRU/RNN twins (a whole ``nn.LSTM`` in a ``torch.export`` graph, e.g.
    PyG's ``JumpingKnowledge(mode="lstm")``): the input's features are the columns of the first
    layer's ``w_ih`` in each direction, so they prune with whatever produces them. The hidden
    units stay whole (stacked layers and directions interleave them; a rule for them is future
    work), with that reason."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x, params = ctx.arg(0, "input"), ctx.arg(2, "params")
        bidirectional = bool(ctx.value(ctx.arg(7, "bidirectional")))
        sx = ctx.shape(x)
        if sx is None or not isinstance(params, (list, tuple)):
            return
        directions = 2 if bidirectional else 1
        layers = int(ctx.value(ctx.arg(4, "num_layers")) or 1)
        # per layer and direction: w_ih, w_hh[, b_ih, b_hh][, w_hr: an LSTM's proj_size]
        stride = len(params) // (layers * directions)
        for d in range(directions):
            if d * stride < len(params) and ctx.shape(params[d * stride]) is not None:
                yield Couple(ctx.space(x, -1), ctx.space(params[d * stride], 1))
        why = "the recurrent layer's hidden units are kept whole (its input features prune)"
        for k, s in enumerate(ctx.item_shapes(ctx.node) or []):
            if s is not None:
                yield from (Freeze(ctx.item(k, dim), why) for dim in range(len(s)))
