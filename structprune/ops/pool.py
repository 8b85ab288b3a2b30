"""Channel-preserving spatial ops: pooling, adaptive pooling, upsampling, padding, pixel shuffle.

They act on the trailing spatial dims only, so batch and channel dims map to themselves and the
spatial dims (which change size) are left frozen.
"""
from __future__ import annotations

from typing import Iterator

import torch.nn as nn
import torch.nn.functional as F

from ..rules import Couple, CoupleContext, OpRule, Record, register

_POOL_1D = (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
            F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d)
_POOL_2D = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
            nn.FractionalMaxPool2d, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
            F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d)
_POOL_3D = (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
            F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)


def keep_leading(ctx: CoupleContext, n_trailing: int) -> Iterator[Record]:
    """Identity on every dim but the last ``n_trailing`` of input 0 (and of tuple items)."""
    x = ctx.arg(0, "input")
    sx = ctx.shape(x)
    if sx is None:
        return
    lead = range(max(len(sx) - n_trailing, 0))
    if ctx.out_shape is not None:
        yield from ctx.identity(x, ctx.node, lead)
    for k, s in enumerate(ctx.item_shapes(ctx.node) or []):  # max pool with return_indices
        if s is not None:
            for d in lead:
                yield Couple(ctx.space(x, d), ctx.item(k, d))


@register(*_POOL_1D)
class Pool1dRule(OpRule):
    """1-d pooling: the last dim is spatial."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        return keep_leading(ctx, 1)


@register(*_POOL_2D)
class Pool2dRule(OpRule):
    """2-d pooling and fixed-factor upsampling modules: the last two dims are spatial."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        return keep_leading(ctx, 2)


@register(*_POOL_3D)
class Pool3dRule(OpRule):
    """3-d pooling: the last three dims are spatial."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        return keep_leading(ctx, 3)


@register(nn.Upsample, F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
class InterpolateRule(OpRule):
    """Resampling of the spatial dims: everything after the channel dim (dim 1)."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        sx = ctx.shape(ctx.arg(0, "input"))
        return keep_leading(ctx, len(sx) - 2) if sx else iter(())


_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)


@register(*_PAD_MODULES, F.pad)
class PadRule(OpRule):
    """Padding: ``len(pad) // 2`` trailing dims change size; the rest map to themselves."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        pad = ctx.module.padding if ctx.module is not None else ctx.value(ctx.arg(1, "pad"))
        return keep_leading(ctx, len(pad) // 2)


@register(nn.PixelShuffle, F.pixel_shuffle, nn.PixelUnshuffle, F.pixel_unshuffle)
class PixelShuffleRule(OpRule):
    """Pixel (un)shuffle: one channel of the smaller side is a block of r*r on the larger side."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx, so = ctx.shape(x), ctx.out_shape
        ch = len(sx) - 3
        for d in range(ch):
            yield Couple(ctx.space(x, d), ctx.out(d))
        if sx[ch] > so[ch]:  # shuffle: C*r^2 -> C
            r2 = sx[ch] // so[ch]
            yield Couple.block(ctx.out(ch), ctx.space(x, ch), so[ch], r2)
        else:
            r2 = so[ch] // sx[ch]
            yield Couple.block(ctx.space(x, ch), ctx.out(ch), sx[ch], r2)


@register(nn.ChannelShuffle, F.channel_shuffle, getattr(F, "native_channel_shuffle", F.channel_shuffle))
class ChannelShuffleRule(OpRule):
    """Channel shuffle with ``g`` groups: unit j takes index j of every group, on both sides."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        import numpy as np

        x = ctx.arg(0, "input")
        g = ctx.module.groups if ctx.module is not None else int(ctx.value(ctx.arg(1, "groups")))
        c = ctx.shape(x)[1]
        per = c // g
        yield from ctx.identity(x, ctx.node, [d for d in range(len(ctx.shape(x))) if d != 1])
        i, j = np.divmod(np.arange(c), per)  # input index i*per + j
        yield Couple(ctx.space(x, 1), ctx.out(1), np.arange(c), j * g + i)
        yield Couple(ctx.space(x, 1), ctx.space(x, 1), np.arange(c), j)
