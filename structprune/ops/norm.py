"""Normalisation layers: BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm (modules,
functional and ATen forms).

Every rule honours its op's mode: a dim that a statistic reduces over stays whole, because
removing an entry there changes the statistic of every other entry.

- BatchNorm with stored running statistics (eval mode) is a per-channel affine map: every dim
  maps to itself and a channel goes with its weight, bias and statistics. With batch statistics
  (training mode, ``track_running_stats=False``, ``F.batch_norm(..., training=True)`` or without
  running statistics, as timm's ``ScaledStdConv2d`` standardises its weight) every dim but the
  channel stays whole.
- InstanceNorm using input statistics (the default) keeps its spatial dims whole; GroupNorm keeps
  its spatial dims whole and prunes whole groups of channels.
- LayerNorm normalises over its trailing dims and subtracts their mean: those dims are frozen
  (exactness first). :class:`ApproximateLayerNormRule` is the opt-in, inexact alternative
  (``exact = False``), returned by :func:`normalized_dims_rules` for ``prune_normalized_dims``.
- RMSNorm's normalised dims are prunable exactly: removing ``d - d'`` of ``d`` entries equals
  zeroing them once the kept weight is scaled by ``sqrt(d/d')`` and ``eps`` by ``d/d'``, which
  the rule's ``update`` does (see :class:`LayerNormRule`). Transformer residual streams
  normalised by RMSNorm (Llama, Qwen) can therefore be narrowed without changing the output.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rules import Couple, CoupleContext, Freeze, OpRule, Record, Role, Space, register

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
        yield Role(p, "norm" if p.name.endswith("weight") else "bias")


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


_RMS_KEYS = (nn.RMSNorm, F.rms_norm) if hasattr(nn, "RMSNorm") else ()
_RMS_TARGETS = (F.rms_norm,) if hasattr(F, "rms_norm") else ()


def _normalized_ndim(ctx: CoupleContext) -> int:
    """How many trailing dims a LayerNorm/RMSNorm call normalises over."""
    if ctx.module is not None:
        return len(ctx.module.normalized_shape)
    ns = ctx.value(ctx.arg(1, "normalized_shape"))
    return 1 if isinstance(ns, int) else len(ns)


def _is_rms(node: Any, module: Any) -> bool:
    if module is not None:
        return hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)
    rms_aten = getattr(getattr(torch.ops.aten, "rms_norm", None), "default", None)
    return node.target in _RMS_TARGETS or (rms_aten is not None and node.target is rms_aten)


def _norm_args(node: Any) -> tuple[Any, Any, Any]:
    """``(normalized_shape, weight, eps)`` of a functional ``rms_norm``/``layer_norm`` call
    (``layer_norm``'s bias sits between weight and eps)."""
    def arg(i: int, name: str) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name)
    return arg(1, "normalized_shape"), arg(2, "weight"), arg(3, "eps")


def _coupled_trailing(ctx: CoupleContext, k: int, params: list[Space],
                      roles: list[str]) -> Iterator[Record]:
    """Couple every dim of input and output; the last ``k`` dims also to dims ``0..k-1`` of
    each parameter (``params``: the space of each parameter's dim 0)."""
    x = ctx.arg(0, "input")
    sx = ctx.shape(x)
    yield from ctx.identity(x, ctx.node)
    lead = len(sx) - k
    for space, role in zip(params, roles):
        for j in range(k):
            p = space.with_dim(j)
            yield Couple(ctx.space(x, lead + j), p)
            yield Role(p, role)


@register(nn.LayerNorm, F.layer_norm, *_RMS_KEYS)
class LayerNormRule(OpRule):
    """LayerNorm: the normalised trailing dims are frozen. RMSNorm: prunable there, exactly.

    Leading dims map to themselves. LayerNorm subtracts the mean over its normalised dims:
    removing entries there changes the statistics of the rest, so those dims stay whole (see
    :class:`ApproximateLayerNormRule` for the opt-in inexact alternative).

    RMSNorm only divides by ``sqrt(mean(x^2) + eps)``. When ``d'`` of ``d`` normalised entries
    are kept and the others are zero (the masked original), the kept entries' mean of squares is
    ``d/d'`` times the masked one, so scaling ``eps`` by ``d/d'`` and the weight by
    ``sqrt(d/d')`` makes removal equal masking. ``update`` does that: for ``nn.RMSNorm`` on
    the module (weight, ``eps``, ``normalized_shape``; a module without a weight stays frozen,
    there being nothing to carry the scale), for ``F.rms_norm``/``aten.rms_norm`` on the call
    (``eps`` and ``normalized_shape`` arguments, and a ``mul`` node after it that carries the
    scale, since the weight is a graph value the rule cannot rewrite in place).
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        k = _normalized_ndim(ctx)
        if _is_rms(ctx.node, ctx.module) and (ctx.module is None or ctx.has_param("weight")):
            if ctx.module is not None:
                params = [ctx.param("weight", 0)]
            else:
                w = _norm_args(ctx.node)[1]
                params = [ctx.space(w, 0)] if ctx.shape(w) is not None else []
            yield from _coupled_trailing(ctx, k, params, ["norm"])
            return
        lead = len(sx) - k
        yield from ctx.identity(x, ctx.node, range(lead))
        name = type(ctx.module).__name__ if ctx.module is not None else "layer_norm"
        reason = (f"{name} normalises over its last {k} dim(s); removing entries there changes "
                  f"the statistics of the rest")
        if _is_rms(ctx.node, ctx.module):
            reason = f"{name} has no weight to carry the rescaling that exact removal needs"
        for d in range(lead, len(sx)):
            yield Freeze(ctx.space(x, d), reason)
            yield Freeze(ctx.out(d), reason)

    def size_args(self, node: Any) -> set:
        """``normalized_shape`` of the functional form: rewritten by ``update`` where the
        normalised dims are pruned (RMSNorm), frozen otherwise."""
        return set() if node.op == "call_module" else {1, "normalized_shape"}

    def update(self, actx: Any) -> None:
        if not _is_rms(actx.node, actx.module):
            return
        x = actx.node.args[0]
        old, new = actx.old_shape(x), actx.new_shape(x)
        if old is None or old == new:
            return
        if actx.module is not None:
            _rescale_rms_module(actx.module, old, new, actx.value(x))
        else:
            _rescale_rms_call(actx, old, new)

    def macs(self, mctx: Any) -> int:
        return math.prod(mctx.shape(mctx.node))


def _eps(eps: Any, x: Any) -> float:
    """``eps``, or what torch uses for ``eps=None``: the machine epsilon of ``x``'s dtype."""
    if eps is not None:
        return float(eps)
    dtype = x.dtype if isinstance(x, torch.Tensor) else torch.get_default_dtype()
    return float(torch.finfo(dtype).eps)


def _rescale_rms_module(m: nn.Module, old: tuple, new: tuple, x: Any) -> None:
    """Shrink ``m.normalized_shape`` to ``new``'s trailing dims and rescale weight and eps.

    Idempotent: the module's ``normalized_shape`` says whether this already ran (the weight
    has been sliced before, by the plan, either way)."""
    k = len(m.normalized_shape)
    shape = tuple(new[len(new) - k:])
    if tuple(m.normalized_shape) == shape:
        return
    ratio = math.prod(m.normalized_shape) / math.prod(shape)
    m.eps = _eps(m.eps, x) * ratio
    w = m.weight
    m.weight = nn.Parameter(w.detach() * math.sqrt(ratio), requires_grad=w.requires_grad)
    m.normalized_shape = shape


_SCALE_META = "structprune_rms_scale"


def _rescale_rms_call(actx: Any, old: tuple, new: tuple) -> None:
    """``rms_norm(x, shape, w, eps)`` -> ``rms_norm(x, shape', w, eps * d/d') * sqrt(d/d')``.

    The ``mul`` node goes right after the call, so the running pass evaluates it next; the
    node's meta records the original eps and the inserted node, so a second pass (apply runs
    the graph on meta first, then for real if a meta kernel is missing) changes nothing more."""
    node = actx.node
    if _SCALE_META in node.meta:
        return
    shape_arg, _, eps = _norm_args(node)
    k = 1 if isinstance(actx.value(shape_arg), int) else len(actx.value(shape_arg))
    d_old, d_new = math.prod(old[len(old) - k:]), math.prod(new[len(new) - k:])
    ratio = d_old / d_new
    actx.set_arg(1, "normalized_shape", list(new[len(new) - k:]))
    actx.set_arg(3, "eps", _eps(actx.value(eps), actx.value(node.args[0])) * ratio)
    graph = node.graph
    with graph.inserting_after(node):
        mul = graph.call_function(operator.mul, (node, math.sqrt(ratio)))
    node.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
    node.meta[_SCALE_META] = mul


class ApproximateLayerNormRule(OpRule):
    """Opt-in: prune LayerNorm's normalised dims, which is *not* exact (``exact = False``).

    Couples the normalised dims through (input, output, weight and bias) and slices them;
    ``update`` shrinks ``normalized_shape``. LayerNorm's mean and variance over the kept entries
    differ from the masked original's, so the pruned model deviates; the pruner measures and
    reports that deviation instead of guaranteeing equality. Use it through
    :func:`normalized_dims_rules` (``prune_normalized_dims=True``) for transformer residual
    streams, followed by fine-tuning.
    """

    exact = False

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        k = _normalized_ndim(ctx)
        params, roles = [], []
        for i, name, role in ((2, "weight", "norm"), (3, "bias", "bias")):
            if ctx.module is not None and ctx.has_param(name):
                params.append(ctx.param(name, 0))
            elif ctx.module is None and ctx.shape(ctx.arg(i, name)) is not None:
                params.append(ctx.space(ctx.arg(i, name), 0))
            else:
                continue
            roles.append(role)
        yield from _coupled_trailing(ctx, k, params, roles)

    def size_args(self, node: Any) -> set:
        return set() if node.op == "call_module" else {1, "normalized_shape"}

    def update(self, actx: Any) -> None:
        x = actx.node.args[0]
        new = actx.new_shape(x)
        if new is None or new == actx.old_shape(x):
            return
        if actx.module is not None:
            k = len(actx.module.normalized_shape)
            actx.module.normalized_shape = tuple(new[len(new) - k:])
        else:
            ns = actx.value(actx.node.args[1] if len(actx.node.args) > 1
                            else actx.node.kwargs["normalized_shape"])
            k = 1 if isinstance(ns, int) else len(ns)
            actx.set_arg(1, "normalized_shape", list(new[len(new) - k:]))

    def macs(self, mctx: Any) -> int:
        return math.prod(mctx.shape(mctx.node))


def normalized_dims_rules() -> dict:
    """The rules that make LayerNorm's normalised dims prunable (approximately), keyed like the
    registry: ``nn.LayerNorm``, ``F.layer_norm`` and ``aten.layer_norm.default``. The Pruner
    merges them into its rules for ``prune_normalized_dims=True``. RMSNorm needs none: its
    built-in rule is exact."""
    rule = ApproximateLayerNormRule()
    keys: list[Any] = [nn.LayerNorm, F.layer_norm]
    aten_ln = getattr(getattr(torch.ops.aten, "layer_norm", None), "default", None)
    if aten_ln is not None:
        keys.append(aten_ln)
    return {k: rule for k in keys}
