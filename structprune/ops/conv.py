"""Convolutions: 1d/2d/3d, transposed, grouped and depthwise; modules and ``F.conv*d``.

A plain conv ties output channel i to weight row i (and bias i) and input channel j to weight
column j. A grouped conv (``groups`` > 1, depthwise included) is pruned one of two ways, a
:class:`~structprune.rules.Choice` the solver settles with the rest of the graph:

* by whole groups: every input and output channel of one group is one unit, so the kept groups
  stay equal and ``groups`` shrinks (ResNeXt's 32 groups of 4; depthwise convs, whose
  ``groups == in_channels`` ties each input channel to its output channels);
* by position within the groups: output channel j of every group is one unit, and so is input
  channel i of every group, so ``groups`` stays and each group gets narrower (ResNeXt's
  split attention: 2 groups of 64 outputs, viewed as ``(radix, C)`` and pruned along C).

The one offering more units comes first.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from ..rules import Choice, Couple, CoupleContext, Freeze, OpRule, Record, Role, Space, register

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_couplings(ctx: CoupleContext, x: Any, w: Any, bias: Optional[Space], groups: int,
                   n_spatial: int, transposed: bool) -> Iterator[Record]:
    """The couplings of a conv call; ``w(d)`` gives the space of the weight's dim ``d``.

    The weight is ``[C_out, C_in/groups, *k]`` (``[C_in, C_out/groups, *k]`` when transposed).
    """
    sx, so = ctx.shape(x), ctx.out_shape
    ch = len(sx) - n_spatial - 1
    if ch == 1:
        yield Couple(ctx.space(x, 0), ctx.out(0))  # the batch
    x_ch, o_ch = ctx.space(x, ch), ctx.out(ch)
    c_in, c_out = sx[ch], so[ch]
    w_out, w_in = (w(1), w(0)) if transposed else (w(0), w(1))
    if bias is not None:
        yield Role(bias, "bias")
        yield Couple(o_ch, bias)
    if groups == 1:
        yield Role(w_out, "out")
        yield Role(w_in, "in")
        yield Couple(o_ch, w_out)
        yield Couple(x_ch, w_in)
        return
    in_g, out_g = c_in // groups, c_out // groups
    if transposed:
        w_flat, w_group, flat_ch, group_ch, flat_g, group_g = w(0), w(1), x_ch, o_ch, in_g, out_g
    else:
        w_flat, w_group, flat_ch, group_ch, flat_g, group_g = w(0), w(1), o_ch, x_ch, out_g, in_g
    yield Role(w_flat, "in" if transposed else "out")
    yield Role(w_group, "out" if transposed else "in")
    yield Couple(flat_ch, w_flat)
    # Whole groups: tie every channel of group g (inputs and outputs) to the group's first
    # output; the weight's per-group dim stays whole.
    whole = [Couple(o_ch, o_ch, np.arange(c_out), np.repeat(np.arange(groups) * out_g, out_g)),
             Couple(x_ch, o_ch, np.arange(c_in), np.repeat(np.arange(groups) * out_g, in_g)),
             Freeze(w_group, "a grouped conv pruned by whole groups keeps each group's width")]
    # By position: channel j of every group is one unit, on either side; the weight's
    # per-group dim follows the positions of the channels it reads (or, transposed, writes).
    flat_pos, group_pos = np.arange(c_in if transposed else c_out), np.arange(
        c_out if transposed else c_in)
    position = [Couple(flat_ch, flat_ch, flat_pos, flat_pos % flat_g),
                Couple(group_ch, group_ch, group_pos, group_pos % group_g),
                Couple(group_ch, w_group, group_pos, group_pos % group_g)]
    options = [(o_ch, whole), (o_ch, position)]
    yield Choice(options[::-1] if min(in_g, out_g) > groups else options)


def groups_after(gone: np.ndarray, flat_before: int, groups: int) -> int:
    """``groups`` after the plan removed indices ``gone`` of the weight's flat dim (size
    ``flat_before``): fewer when whole groups went, the same when channels went by position
    within the groups (:func:`conv_couplings`)."""
    if groups <= 1 or not len(gone):
        return groups
    size = flat_before // groups
    blocks = np.unique(np.asarray(gone) // size)
    return groups - len(blocks) if len(gone) == len(blocks) * size else groups


def update_groups(actx: Any, pos: int) -> None:
    """A functional conv's ``groups`` argument (at ``pos``) after the plan: fewer when whole
    groups went (:func:`groups_after`)."""
    node = actx.node
    groups = actx.value(node.args[pos] if len(node.args) > pos else node.kwargs.get("groups", 1))
    if isinstance(groups, int) and groups > 1:
        w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        new = groups_after(actx.dropped(actx.space(w, 0)), actx.old_shape(w)[0], groups)
        if new != groups:
            actx.set_arg(pos, "groups", new)


def _graph_groups(gm: Any, path: str) -> Optional[int]:
    """``groups`` of the conv call in graph ``gm`` that reads ``path.weight`` (an export graph
    calls ``aten.conv2d`` on the module's tensors instead of the module), or None."""
    for n in gm.graph.nodes if gm is not None else ():
        w = n.args[1] if n.op == "call_function" and len(n.args) > 1 else None
        if getattr(w, "op", None) == "get_attr" and w.target == f"{path}.weight":
            pos = 8 if "convolution" in str(n.target) else 6
            g = n.args[pos] if len(n.args) > pos else n.kwargs.get("groups", 1)
            return g if isinstance(g, int) else None
    return None


def _update_conv(actx: Any, transposed: bool) -> None:
    m = actx.module
    w = m.weight  # already sliced
    if actx.node is not None:
        gone = actx.dropped(Space.param(f"{actx.node.target}.weight", 0))
        m.groups = groups_after(gone, w.shape[0] + len(gone), m.groups)
    else:  # the module's tensors were sliced in a graph that calls them (pruned in place)
        m.groups = _graph_groups(actx.graph, actx.path) or m.groups
    if transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _conv_macs(mctx: Any, w_shape: tuple, transposed: bool) -> int:
    ref = mctx.shape(mctx.node.args[0]) if transposed else mctx.shape(mctx.node)
    return math.prod(ref) * math.prod(w_shape[1:]) if ref else 0


class _ModuleConvRule(OpRule):
    transposed = False

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        m = ctx.module
        bias = ctx.param("bias", 0) if m.bias is not None else None
        yield from conv_couplings(ctx, ctx.arg(0, "input"), lambda d: ctx.param("weight", d),
                                  bias, m.groups, m.weight.dim() - 2, self.transposed)

    def update(self, actx: Any) -> None:
        _update_conv(actx, self.transposed)

    def macs(self, mctx: Any) -> int:
        return _conv_macs(mctx, mctx.param_shape("weight"), self.transposed)


@register(*_CONV)
class ConvRule(_ModuleConvRule):
    """``nn.Conv{1,2,3}d``: out channels = weight rows (+ bias), in channels = weight columns."""


@register(*_CONV_T)
class ConvTransposeRule(_ModuleConvRule):
    """``nn.ConvTranspose{1,2,3}d``: weight is ``[C_in, C_out/groups, *k]``."""

    transposed = True


@register(F.conv1d, F.conv2d, F.conv3d)
class FunctionalConvRule(OpRule):
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)``."""

    transposed = False

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
        sw = ctx.shape(w)
        if sw is None:
            return
        groups = int(ctx.value(ctx.arg(6, "groups", 1)))
        bias = ctx.space(b, 0) if ctx.shape(b) is not None else None
        yield from conv_couplings(ctx, x, lambda d: ctx.space(w, d), bias, groups, len(sw) - 2,
                                  transposed=self.transposed)

    def update(self, actx: Any) -> None:
        update_groups(actx, 6)

    def macs(self, mctx: Any) -> int:
        w = mctx.node.args[1] if len(mctx.node.args) > 1 else mctx.node.kwargs["weight"]
        return _conv_macs(mctx, mctx.shape(w) or (0,), transposed=self.transposed)
