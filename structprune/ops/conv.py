"""Convolutions: 1d/2d/3d, transposed, grouped and depthwise; modules and ``F.conv*d``.

A plain conv ties output channel i to weight row i (and bias i) and input channel j to weight
column j. A grouped conv (``groups`` > 1, depthwise included) is pruned by whole groups: every
input and output channel of one group is one unit, so the kept groups stay equal and ``groups``
simply shrinks. Depthwise convs with ``groups == in_channels`` thus tie each input channel to its
output channels.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from ..rules import Couple, CoupleContext, OpRule, Record, Role, Space, register

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
    # Whole groups: tie every channel of group g (inputs and outputs) to the group's first output;
    # the weight's per-group dim stays whole.
    in_g, out_g = c_in // groups, c_out // groups
    if transposed:
        yield Role(w(0), "in")
        yield Couple(x_ch, w(0))
    else:
        yield Role(w(0), "out")
        yield Couple(o_ch, w(0))
    yield Couple(o_ch, o_ch, np.arange(c_out), np.repeat(np.arange(groups) * out_g, out_g))
    yield Couple(x_ch, o_ch, np.arange(c_in), np.repeat(np.arange(groups) * out_g, in_g))


def _update_conv(m: nn.Module, transposed: bool) -> None:
    w = m.weight
    if transposed:
        per_group = m.in_channels // m.groups
        m.groups = max(1, w.shape[0] // per_group)
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:
        per_group = m.out_channels // m.groups
        m.groups = max(1, w.shape[0] // per_group)
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
        _update_conv(actx.module, self.transposed)

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
        # Whole groups go, so ``groups`` shrinks with the weight's first (ungrouped) dim.
        groups = actx.node.args[6] if len(actx.node.args) > 6 else actx.node.kwargs.get("groups", 1)
        if isinstance(groups, int) and groups > 1:
            w = actx.node.args[1] if len(actx.node.args) > 1 else actx.node.kwargs["weight"]
            old, new = actx.old_shape(w)[0], actx.new_shape(w)[0]
            actx.set_arg(6, "groups", groups * new // old)

    def macs(self, mctx: Any) -> int:
        w = mctx.node.args[1] if len(mctx.node.args) > 1 else mctx.node.kwargs["weight"]
        return _conv_macs(mctx, mctx.shape(w) or (0,), transposed=self.transposed)
