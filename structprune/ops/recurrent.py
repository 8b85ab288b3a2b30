"""Recurrent cells (``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell``), whole recurrent modules
(``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) and their ATen ops.

A cell with hidden size H stacks its G gates in the rows of its weights (RNN: 1, GRU: 3 ``r, z,
n``, LSTM: 4 ``i, f, g, o``): hidden unit ``j`` owns rows ``g*H + j`` of ``w_ih``, ``w_hh``
and the biases, column ``j`` of ``w_hh``, and entry ``j`` of the state(s) in and out. Every
gate of unit ``j`` reads the previous state only through column ``j`` of ``w_hh``, and writes
only entry ``j`` of the new state, so removing the unit (all of it at once) is exact: the
other units see a zero where it was, which is what the masked original gives them. The input
features map to the columns of ``w_ih``. GatedGraphConv runs a ``GRUCell`` per layer.

A whole module is traced through as one call of :func:`rnn_forward` whose weights are graph
values (:class:`RNNModuleRule`, :class:`RNNForwardRule`; ``aten.lstm.input`` and its twins in
``torch.export`` graphs: :class:`AtenRNNInputRule`): unit ``j`` is one unit in every layer and
direction, and the masked oracle, zeroing its weight slices, zeroes it at every step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..rules import (ApplyContext, Couple, CoupleContext, OpRule, Record, Role, Space,
                     aten_ops, register)


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


_INPUT_GATES = {op: g for name, g in (("lstm.input", 4), ("gru.input", 3), ("rnn_tanh.input", 1),
                                        ("rnn_relu.input", 1)) for op in aten_ops(name)}


@register(*_INPUT_GATES)
class AtenRNNInputRule(OpRule):
    """``aten.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
    batch_first)`` and the GRU/RNN twins (a whole ``nn.LSTM`` in a ``torch.export`` graph, e.g.
    PyG's ``JumpingKnowledge(mode="lstm")``): the units of :class:`RNNForwardRule` (hidden units
    with their gate rows in every layer and direction, ``proj_size``'s projected units, the
    input's features as the first layer's ``w_ih`` columns). The graph computes with the
    weights it is given, so there is no module attribute to follow; a zero initial state the
    graph builds follows the new sizes (``FactoryRule``)."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x, hx, params = ctx.arg(0, "input"), ctx.arg(1, "hx"), ctx.arg(2, "params")
        if ctx.shape(x) is None or not isinstance(params, (list, tuple)) or not all(
                ctx.shape(w) is not None for w in params):
            return
        gates = _INPUT_GATES[ctx.node.target]
        leaves = dict(ctx.item_leaves(ctx.node))
        outs = [Space.item(ctx.node.name, k, len(leaves[(k,)]) - 1)
                for k in range(3 if gates == 4 else 2)]
        yield from rnn_couplings(
            ctx, x, hx, list(params), outs, gates, bool(ctx.value(ctx.arg(3, "has_biases"))),
            int(ctx.value(ctx.arg(4, "num_layers"))), bool(ctx.value(ctx.arg(7, "bidirectional"))),
            bool(ctx.value(ctx.arg(8, "batch_first"))))

    def macs(self, mctx: Any) -> int:
        args = mctx.node.args
        dirs = 2 if args[7] else 1
        return rnn_macs(mctx.shape(args[0]), [mctx.shape(w) for w in args[2]],
                        _INPUT_GATES[mctx.node.target], int(args[4]), dirs)


# --- whole recurrent modules: nn.LSTM, nn.GRU, nn.RNN --------------------------------------------

#: gates per mode of ``rnn_forward`` (the rows of ``w_ih``/``w_hh`` are ``gates * hidden``)
_MODE_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_MODE_OPS = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh,
             "RNN_RELU": torch.rnn_relu}


def rnn_forward(mode: str, input: torch.Tensor, hx: Any, weights: list, has_biases: bool,
                num_layers: int, dropout: float, training: bool, bidirectional: bool,
                batch_first: bool, owner: Optional[nn.Module] = None) -> tuple:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``'s forward on explicit weights, with every size read
    from the weights (none from module attributes), so a graph that calls it stays right when
    the weights are sliced. ``weights`` are the module's ``_flat_weights`` in their order.

    Returns a flat tuple: ``(output, h_n, c_n)`` for an LSTM, ``(output, h_n)`` otherwise.
    A 2-D input is one unbatched sequence, as for the modules. A ``PackedSequence`` input is
    refused here (the tracer keeps such a call a frozen leaf). ``owner`` (the module, in the
    graph a ``get_attr`` of it) is not read: it tells the rule's ``update`` which module's
    ``hidden_size``/``proj_size``/``input_size`` to fix."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"rnn_forward takes a tensor input, not {type(input).__name__} (a "
                        f"PackedSequence is kept a frozen leaf by the tracer)")
    gates = _MODE_GATES[mode]
    dirs = 2 if bidirectional else 1
    w_hh = weights[1]
    hidden, state = w_hh.shape[0] // gates, w_hh.shape[1]
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(0 if batch_first else 1)
    batch = input.shape[0 if batch_first else 1]
    lstm = mode == "LSTM"
    if hx is None:
        h0 = input.new_zeros(num_layers * dirs, batch, state)
        hx = (h0, input.new_zeros(num_layers * dirs, batch, hidden)) if lstm else h0
    elif not batched:
        hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
    if lstm:
        hx = tuple(hx)
    out = _MODE_OPS[mode](input, hx, list(weights), has_biases, num_layers, dropout, training,
                          bidirectional, batch_first)
    output, states = out[0], tuple(out[1:])
    if not batched:
        output = output.squeeze(0 if batch_first else 1)
        states = tuple(s.squeeze(1) for s in states)
    return (output,) + states


def _mode(module: nn.Module) -> str:
    if isinstance(module, nn.RNN):
        return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"
    return "LSTM" if isinstance(module, nn.LSTM) else "GRU"


@register(nn.LSTM, nn.GRU, nn.RNN)
class RNNModuleRule(OpRule):
    """``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (any layers, directions, ``proj_size``,
    ``batch_first``, ``bias``, with or without an initial state): traced through as one call of
    :func:`rnn_forward` with the weights as graph values, which :class:`RNNForwardRule` couples
    (hidden units prunable). A ``PackedSequence`` input, or a module the user made a leaf,
    stays one frozen ``call_module`` node, with the reason."""

    decomposes = True

    def trace_through(self, module: nn.Module, getp: Callable[[str], Any], *args: Any,
                      **kwargs: Any) -> Any:
        assert isinstance(module, nn.RNNBase)
        bound = _bind(args, kwargs)
        if bound is None:
            return NotImplemented
        x, hx = bound
        tracer = getattr(x, "tracer", None)
        if not isinstance(x, fx.Proxy) or tracer is None:
            return NotImplemented  # e.g. a PackedSequence
        mode = _mode(module)
        weights = [getp(n) for n in module._flat_weights_names]
        path = str(weights[0].node.target).rpartition(".")[0]
        owner = tracer.create_proxy("get_attr", path, (), {}) if path else None
        out = tracer.create_proxy(
            "call_function", rnn_forward,
            (mode, x, hx, weights, module.bias, module.num_layers, float(module.dropout),
             module.training, module.bidirectional, module.batch_first),
            {"owner": owner} if owner is not None else {})
        if mode == "LSTM":
            return out[0], (out[1], out[2])
        return out[0], out[1]

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        reason = (f"{type(ctx.module).__name__} '{ctx.module_path}' is kept whole (a leaf module, "
                  f"or a PackedSequence input, which the traced equivalent does not cover)")
        yield from ctx.freeze_call(reason)


def _bind(args: tuple, kwargs: dict) -> Optional[tuple[Any, Any]]:
    """``(input, hx)`` of a ``forward(input, hx=None)`` call, or None for other arguments."""
    kwargs = dict(kwargs)
    names = ["input", "hx"]
    vals = list(args) + [None] * (2 - len(args))
    if len(args) > 2:
        return None
    for i, n in enumerate(names):
        if n in kwargs:
            if i < len(args):
                return None
            vals[i] = kwargs.pop(n)
    return None if kwargs else (vals[0], vals[1])


def _owner(actx: ApplyContext) -> Optional[nn.Module]:
    """The module traced through (``rnn_forward``'s ``owner``), whose attributes follow its
    sliced weights; None for a call with the weights of no module (or a root module)."""
    m = actx.value(actx.node.kwargs.get("owner"))
    return m if isinstance(m, nn.RNNBase) else None


def rnn_couplings(ctx: CoupleContext, x: Any, hx: Any, weights: list, outs: list[Space],
                  gates: int, has_biases: bool, num_layers: int, bidirectional: bool,
                  batch_first: bool) -> Iterator[Record]:
    """The units of a whole recurrent layer stack (see :class:`RNNForwardRule`)."""
    dirs = 2 if bidirectional else 1
    per = len(weights) // (num_layers * dirs)
    proj = per - (4 if has_biases else 2) == 1
    w = [[ctx.space(weights[(l * dirs + d) * per + k], 0) for k in range(per)]
         for l in range(num_layers) for d in range(dirs)]
    sw_hh = ctx.shape(weights[1])
    hidden, state = sw_hh[0] // gates, sw_hh[1]
    hrep = w[0][per - 1].with_dim(1) if proj else w[0][1].with_dim(1)  # hidden unit j
    srep = w[0][1].with_dim(1)  # state unit (= hidden unit without a projection)
    unit_rows = np.tile(np.arange(hidden), gates)
    rows = np.arange(gates * hidden)
    by_dir = np.tile(np.arange(state), dirs)
    for k, block in enumerate(w):
        layer = k // dirs
        for i, s in enumerate(block):  # rows: the units a weight produces; columns: it reads
            yield Role(s, "out")
            if len(ctx.shape(weights[k * per + i]) or ()) == 2:
                yield Role(s.with_dim(1), "in")
        for s in [block[0], block[1]] + (block[2:4] if has_biases else []):
            yield Couple(hrep, s, unit_rows, rows)  # every gate's row of unit j
        yield Couple(srep, block[1].with_dim(1))  # w_hh reads the state
        if proj:
            yield Couple(hrep, block[-1].with_dim(1))  # w_hr reads the hidden units
            yield Couple(srep, block[-1])  # and writes the state
        if layer == 0:
            if ctx.shape(x) is not None:
                yield Couple(ctx.space(x, -1), block[0].with_dim(1))
        else:  # the previous layer's output: both directions' states, side by side
            yield Couple(srep, block[0].with_dim(1), by_dir, np.arange(dirs * state))
    out, h_n = outs[0], outs[1]
    yield Couple(srep, out, by_dir, np.arange(dirs * state))
    yield Couple(srep, h_n)
    if len(outs) > 2:
        yield Couple(hrep, outs[2])
    states = _state_spaces(ctx, hx)
    if states:
        yield Couple(srep, states[0])
        if len(states) > 1:
            yield Couple(hrep, states[1])
    sx = ctx.shape(x)
    if sx is not None and len(sx) == 3:  # batched: the batch dim maps through
        bx = ctx.space(x, 0 if batch_first else 1)
        yield Couple(bx, out.with_dim(0 if batch_first else 1))
        for s in outs[1:] + states:
            yield Couple(bx, s.with_dim(1))


def rnn_macs(sx: tuple, weights: list[tuple], gates: int, num_layers: int, dirs: int) -> int:
    """Multiply-accumulates of a layer stack: per step, direction and layer, every gate's input
    and recurrent products (and the projection's)."""
    per = len(weights) // (num_layers * dirs)
    steps = int(np.prod(sx[:-1]))
    total = 0
    for k in range(num_layers * dirs):
        w_ih, w_hh = weights[k * per], weights[k * per + 1]
        total += w_ih[0] * w_ih[1] + w_hh[0] * w_hh[1]
        if per in (3, 5):  # w_hr
            w_hr = weights[k * per + per - 1]
            total += w_hr[0] * w_hr[1]
    return steps * total


@register(rnn_forward)
class RNNForwardRule(OpRule):
    """:func:`rnn_forward` (a whole ``nn.LSTM``/``nn.GRU``/``nn.RNN``): hidden unit ``j`` is one
    unit in every layer and direction (the module has one ``hidden_size``): rows ``g*H + j`` of
    every ``w_ih``, ``w_hh`` and bias, and what reads the state: column ``j`` of every
    ``w_hh``, columns ``d*H + j`` of the next layer's ``w_ih`` (both directions' outputs side by
    side), entry ``d*H + j`` of the output, entry ``j`` of ``h_n`` and of the initial state.
    With ``proj_size`` the state is the projection's output: the hidden units (rows of the
    gates, columns of ``w_hr``, ``c_n``) and the projected units (rows of ``w_hr``, the rest)
    are two units. The time dim stays whole; the batch dim maps through.

    Removing a unit is exact: a unit whose gate rows are zero stays at zero from a zero initial
    state (LSTM: ``c' = c/2``, ``h' = tanh(c')/2``; GRU: ``h' = h/2``; RNN: ``tanh(0)``), and
    its column of ``w_hh`` then multiplies zero; the masked oracle zeroes exactly those weight
    slices (they are graph values here)."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        args = ctx.node.args
        mode, x, hx, weights = args[0], args[1], args[2], args[3]
        has_biases, num_layers, bidirectional, batch_first = (args[4], args[5], args[8],
                                                              args[9])
        if ctx.shape(x) is None or not all(ctx.shape(w) is not None for w in weights):
            return
        leaves = dict(ctx.item_leaves(ctx.node))
        outs = [Space.item(ctx.node.name, k, len(leaves[(k,)]) - 1)
                for k in range(3 if mode == "LSTM" else 2)]
        yield from rnn_couplings(ctx, x, hx, list(weights), outs, _MODE_GATES[mode],
                                 bool(has_biases), int(num_layers), bool(bidirectional),
                                 bool(batch_first))

    def update(self, actx: ApplyContext) -> None:
        args = actx.node.args
        m = _owner(actx)
        if m is None:
            return
        gates = _MODE_GATES[args[0]]
        m.input_size = m.weight_ih_l0.shape[1]
        m.hidden_size = m.weight_hh_l0.shape[0] // gates
        if getattr(m, "proj_size", 0) > 0:
            m.proj_size = m.weight_hr_l0.shape[0]
        m._init_flat_weights()

    def macs(self, mctx: Any) -> int:
        args = mctx.node.args
        dirs = 2 if args[8] else 1
        return rnn_macs(mctx.shape(args[1]), [mctx.shape(w) for w in args[3]],
                        _MODE_GATES[args[0]], int(args[5]), dirs)
