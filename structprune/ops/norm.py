"""Normalisation layers: BatchNorm, InstanceNorm, GroupNorm, LayerNorm (modules and functional).

BatchNorm and InstanceNorm keep per-channel statistics, so a channel can go on its own. GroupNorm
normalises each group of channels together, so a unit is a whole group. LayerNorm (and RMSNorm)
normalise over their trailing dims: removing an index there changes the statistics of all the
others, so those dims are frozen (exactness first; the embedding of a transformer's residual
stream therefore stays, and its heads and MLP widths are what gets pruned).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..graph.coupling import Couple, Freeze, Record, Role, Space
from .registry import CoupleContext, OpRule, register

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
       nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def _channel_dim(ctx: CoupleContext, x: Any, n_spatial: int | None) -> int:
    nd = len(ctx.shape(x))
    if n_spatial is None:
        return 1 if nd > 1 else 0
    return nd - n_spatial - 1


def _n_spatial(m: nn.Module) -> int | None:
    for k, cls in enumerate(((nn.BatchNorm1d, nn.InstanceNorm1d), (nn.BatchNorm2d, nn.InstanceNorm2d),
                             (nn.BatchNorm3d, nn.InstanceNorm3d))):
        if isinstance(m, cls):
            return None if k == 0 else k + 1
    return None


def stat_couplings(ctx: CoupleContext, x: Any, ch: int, reduced: Sequence[int],
                   reason: str) -> Iterator[Record]:
    """Couple ``x`` to the node's output dim by dim, except the ``reduced`` dims that a
    statistic is computed over: those stay whole (removing an entry there changes the statistic
    of every other entry). ``ch`` is the channel dim, never reduced here."""
    nd = len(ctx.shape(x))
    reduced = {d % nd for d in reduced} - {ch}
    yield from ctx.identity(x, ctx.node, [d for d in range(nd) if d not in reduced])
    for d in sorted(reduced):
        yield Freeze(ctx.space(x, d), reason)
        if ctx.out_shape is not None:
            yield Freeze(ctx.out(d), reason)


def reduced_dims(nd: int, ch: int, kind: str) -> list[int]:
    """The dims a norm's statistics reduce over: ``"batch"`` statistics (batch norm in training
    or without running statistics) every dim but the channel; ``"instance"`` statistics (per
    sample and channel) the dims after the channel; ``"running"`` (stored statistics: a
    per-channel affine map) none."""
    if kind == "batch":
        return [d for d in range(nd) if d != ch]
    if kind == "instance":
        return list(range(ch + 1, nd))
    return []


def _module_stats(m: nn.Module) -> str:
    """Which statistics a BatchNorm/InstanceNorm module uses in its current mode (as
    ``_BatchNorm.forward`` and ``_InstanceNorm.forward`` decide)."""
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "instance" if (m.training or not m.track_running_stats) else "running"
    return "batch" if (m.training or m.running_mean is None) else "running"


@register(*_BN)
class BatchNormRule(OpRule):
    """BatchNorm/InstanceNorm: each channel with its weight, bias and running statistics.

    With stored running statistics (eval mode) the norm is a per-channel affine map and every
    dim of the input maps to itself. Statistics computed from the input (training mode, or
    ``track_running_stats=False``) reduce over the batch and spatial dims (batch norm) or the
    spatial dims (instance norm), so those dims stay whole.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        n_sp = _n_spatial(ctx.module)
        if isinstance(ctx.module, (nn.InstanceNorm1d,)) and len(ctx.shape(x)) == 2:
            n_sp = 1  # unbatched (C, L)
        ch = _channel_dim(ctx, x, n_sp)
        kind = _module_stats(ctx.module)
        yield from stat_couplings(ctx, x, ch, reduced_dims(len(ctx.shape(x)), ch, kind),
                                  f"{type(ctx.module).__name__} computes {kind} statistics "
                                  f"over this dim")
        for name in _PER_CHANNEL:
            if ctx.has_param(name) and getattr(ctx.module, name).dim() == 1:
                yield Couple(ctx.space(x, ch), ctx.param(name, 0))
                yield Role(ctx.param(name, 0), "norm" if name == "weight" else "bias"
                           if name == "bias" else "stat")

    def update(self, actx: Any) -> None:
        m = actx.module
        for name in _PER_CHANNEL:
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                m.num_features = t.shape[0]
                return
        m.num_features = actx.new_shape(actx.node.args[0])[1]

    def macs(self, mctx: Any) -> int:
        return math.prod(mctx.shape(mctx.node))


def functional_stats(ctx: CoupleContext, is_instance: bool, flag_pos: int, flag_name: str,
                     stats_pos: int) -> str:
    """The statistics kind of a functional batch/instance norm call: the ``training`` /
    ``use_input_stats`` flag at ``flag_pos``, and whether a running mean is given at
    ``stats_pos`` (batch norm without one uses batch statistics)."""
    if is_instance:
        use_input = ctx.value(ctx.arg(flag_pos, flag_name, True))
        return "instance" if use_input is None or bool(use_input) else "running"
    training = bool(ctx.value(ctx.arg(flag_pos, flag_name, False)))
    no_stats = stats_pos < 0 or ctx.shape(ctx.arg(stats_pos, "running_mean")) is None
    return "batch" if training or no_stats else "running"


@register(F.batch_norm, F.instance_norm)
class FunctionalBatchNormRule(OpRule):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, ...)`` and
    ``F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, ...)``.

    Batch statistics (``training=True`` or no running mean, as in timm's ``ScaledStdConv2d``,
    which standardises a weight with ``F.batch_norm(w.reshape(1, out, -1), None, None,
    training=True)``) reduce over every dim but the channel; instance statistics over the dims
    after it. Those dims stay whole.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        nd = len(ctx.shape(x))
        ch = 1 if nd > 1 else 0
        is_instance = ctx.node.target is F.instance_norm
        kind = functional_stats(ctx, is_instance, 5, "use_input_stats" if is_instance
                                else "training", 1)
        name = "instance_norm" if is_instance else "batch_norm"
        yield from stat_couplings(ctx, x, ch, reduced_dims(nd, ch, kind),
                                  f"{name} computes {kind} statistics over this dim")
        for a in ctx.node.all_input_nodes[1:]:
            if ctx.shape(a) is not None and len(ctx.shape(a)) == 1:
                yield Couple(ctx.space(x, ch), ctx.space(a, 0))

    def macs(self, mctx: Any) -> int:
        return math.prod(mctx.shape(mctx.node))


@register(nn.GroupNorm)
class GroupNormRule(OpRule):
    """``nn.GroupNorm``: one unit per group of ``num_channels // num_groups`` channels."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        m = ctx.module
        yield from group_norm_couplings(ctx, ctx.arg(0, "input"), m.num_groups,
                                        [ctx.param(n, 0) for n in ("weight", "bias")
                                         if ctx.has_param(n)])

    def update(self, actx: Any) -> None:
        m = actx.module
        size = m.num_channels // m.num_groups
        m.num_channels = actx.new_shape(actx.node.args[0])[1]
        m.num_groups = m.num_channels // size

    def macs(self, mctx: Any) -> int:
        return math.prod(mctx.shape(mctx.node))


def group_norm_couplings(ctx: CoupleContext, x: Any, num_groups: int,
                         params: list[Space]) -> Iterator[Record]:
    """Whole groups of channels are units; the spatial dims, which each group's statistics
    reduce over, stay whole; the batch dim maps to itself."""
    yield from stat_couplings(ctx, x, 1, range(2, len(ctx.shape(x))),
                              "group_norm computes statistics over this dim")
    c = ctx.shape(x)[1]
    size = c // num_groups
    ch = ctx.space(x, 1)
    yield Couple(ch, ch, np.arange(c), np.repeat(np.arange(num_groups) * size, size))
    for p in params:
        yield Couple(ch, p)
        yield Role(p, "norm" if p.key.endswith("weight") else "bias")


@register(F.group_norm)
class FunctionalGroupNormRule(OpRule):
    """``F.group_norm(x, num_groups, weight, bias, eps)``."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x, g = ctx.arg(0, "input"), int(ctx.value(ctx.arg(1, "num_groups")))
        params = [ctx.space(a, 0) for a in ctx.node.all_input_nodes[1:]
                  if ctx.shape(a) is not None]
        yield from group_norm_couplings(ctx, x, g, params)

    def update(self, actx: Any) -> None:
        x = actx.node.args[0]
        g = actx.node.args[1] if len(actx.node.args) > 1 else actx.node.kwargs["num_groups"]
        if isinstance(g, int):
            size = actx.old_shape(x)[1] // g
            actx.set_arg(1, "num_groups", actx.new_shape(x)[1] // size)


@register(nn.LayerNorm, F.layer_norm, *((nn.RMSNorm, F.rms_norm) if hasattr(nn, "RMSNorm") else ()))
class LayerNormRule(OpRule):
    """LayerNorm/RMSNorm: the normalised trailing dims are frozen; leading dims map to themselves."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        if ctx.module is not None:
            k = len(ctx.module.normalized_shape)
        else:
            ns = ctx.value(ctx.arg(1, "normalized_shape"))
            k = 1 if isinstance(ns, int) else len(ns)
        lead = len(sx) - k
        yield from ctx.identity(x, ctx.node, range(lead))
        reason = (f"{type(ctx.module).__name__ if ctx.module is not None else 'layer_norm'} "
                  f"normalises over its last {k} dim(s); removing entries there changes the "
                  f"statistics of the rest")
        for d in range(lead, len(sx)):
            yield Freeze(ctx.space(x, d), reason)
            yield Freeze(ctx.out(d), reason)

    def macs(self, mctx: Any) -> int:
        return math.prod(mctx.shape(mctx.node))
