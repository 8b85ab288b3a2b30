"""Element-wise ops (with broadcasting), activations, dropout, reductions and softmax.

Masking a channel to zero and removing it agree for these ops as long as every dim they mix
across (a softmax axis, a mean's reduced dims) stays whole, so those dims are left uncoupled and
therefore frozen.
"""
from __future__ import annotations

import operator
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..rules import Couple, CoupleContext, Freeze, OpRule, Record, Role, op_name, register


def touch(ctx: CoupleContext, a: Any) -> Iterator[Freeze]:
    """Mention every dim of ``a`` without coupling it (an input read only for its dtype/shape)."""
    s = ctx.shape(a)
    for d in range(len(s or ())):
        yield Freeze(ctx.space(a, d), "", idx=np.zeros(0, dtype=np.int64))


def broadcast(ctx: CoupleContext, inputs: list[Any], out: Any) -> Iterator[Couple]:
    """Couple each input dim to the output dim it broadcasts to, unless it is stretched from 1."""
    so = ctx.shape(out)
    if so is None:
        return
    for a in inputs:
        sa = ctx.shape(a)
        if sa is None:
            continue
        shift = len(so) - len(sa)
        for d, n in enumerate(sa):
            if d + shift >= 0 and n == so[d + shift]:
                yield Couple(ctx.space(a, d), ctx.space(out, d + shift))


_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid,
    F.hardshrink, F.softshrink, F.threshold, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.sigmoid, F.tanh,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.neg,
    torch.sqrt, torch.rsqrt, torch.square, torch.sin, torch.cos, torch.erf, torch.clamp, torch.clip,
    torch.nan_to_num, torch.sign, torch.reciprocal, torch.log1p, torch.expm1, torch.floor,
    torch.ceil, torch.round, torch.trunc, torch.frac, torch.logit, torch.clone, torch.detach,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like,
    torch.randn_like, operator.neg, operator.pos, operator.invert, abs,
)
# Functions of optional packages, keyed by name so that structprune does not import them.
# torchvision's stochastic depth scales whole samples (identity in eval): channels map to channels.
_UNARY_BY_NAME = ("torchvision.ops.stochastic_depth.stochastic_depth",)
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "abs", "abs_",
    "neg", "sqrt", "rsqrt", "square", "sin", "cos", "erf", "clamp", "clamp_", "clip", "clip_",
    "clamp_min", "clamp_max", "sign", "reciprocal", "log1p", "expm1", "floor", "ceil", "round",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "cpu", "cuda",
    "requires_grad_", "nan_to_num", "logit", "hardtanh", "hardtanh_", "zero_", "fill_",
)


@register(*_UNARY_MODULES, *_UNARY_FUNCTIONS, *_UNARY_METHODS, *_UNARY_BY_NAME, F.normalize)
class UnaryRule(OpRule):
    """Element-wise on one tensor (activations, dropout, casts): every dim maps to itself.

    Also ``F.normalize(x, p, dim)``, ``x / max(||x||_p, eps)`` along ``dim``: for ``p >= 0`` a
    zero entry leaves the norm unchanged, so that dim maps to itself as well (removing units
    there is exact); with ``p < 0``, or a tensor computed from parameters alone (a cosine
    classifier's ``F.normalize(self.weight)``, whose norm would lose the removed entries), the
    normalised dim stays whole with that reason.
    """

    preserves_shape = True

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        if ctx.node.op == "call_function" and ctx.node.target is F.normalize:
            yield from _normalize_couplings(ctx, x)
            return
        if ctx.shape(x) is not None and ctx.shape(x) == ctx.out_shape:
            yield from ctx.identity(x, ctx.node)
        for a in ctx.node.all_input_nodes[1:]:  # e.g. clamp(min=tensor): broadcast like binary
            yield from broadcast(ctx, [a], ctx.node)


def _normalize_couplings(ctx: CoupleContext, x: Any) -> Iterator[Record]:
    """``F.normalize(x, p=2, dim=1)``: every dim maps to itself; the normalised one only where
    zeros leave the p-norm unchanged and ``x`` is not a weight alone (see :class:`UnaryRule`)."""
    sx = ctx.shape(x)
    if sx is None or sx != ctx.out_shape:
        return
    p, dim = ctx.value(ctx.arg(1, "p", 2.0)), ctx.value(ctx.arg(2, "dim", 1))
    if not isinstance(dim, int):
        return
    dim %= len(sx)
    yield from ctx.identity(x, ctx.node, [d for d in range(len(sx)) if d != dim])
    if isinstance(p, (int, float)) and p >= 0 and not _parameters_only(x):
        yield from ctx.identity(x, ctx.node, [dim])
        return
    why = ("normalize divides by a norm of a tensor computed from parameters alone: removing "
           "entries would rescale the kept ones" if isinstance(p, (int, float)) and p >= 0 else
           f"normalize with p={p} depends on zero entries: removing some would change the norm")
    yield Freeze(ctx.space(x, dim), why)
    yield Freeze(ctx.out(dim), why)


@register("type_as", "new_tensor")
class TypeAsRule(OpRule):
    """A copy of one tensor argument that reads another only for its dtype (and device).

    ``x.type_as(y)``: the output is ``x``, ``y`` gives the dtype. ``x.new_tensor(data)``: the
    output is ``data``, ``x`` gives dtype and device. When ``data`` is not a tensor (a list
    literal), the output is a constant that no rule may slice, so it stays frozen.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        if op_name(ctx.node.target) == "new_tensor":
            source, meta = ctx.arg(1, "data"), ctx.arg(0, "self")
        else:
            source, meta = ctx.arg(0, "self"), ctx.arg(1, "other")
        if ctx.shape(source) is not None and ctx.shape(source) == ctx.out_shape:
            yield from ctx.identity(source, ctx.node)
        if isinstance(meta, fx.Node):
            yield from touch(ctx, meta)


_BINARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.pow,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.pow, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.fmax, torch.fmin, torch.hypot, torch.atan2,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "pow", "pow_",
    "maximum", "minimum", "where", "lerp", "addcmul", "addcdiv", "masked_fill", "masked_fill_",
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne,
    "gt", "lt", "ge", "le", "eq", "ne",
)


@register(*_BINARY)
class BroadcastRule(OpRule):
    """Element-wise on several tensors with broadcasting (``x + y``, SE blocks' ``x * s``).

    A dim of size 1 stretched to the output's size stays uncoupled, and so frozen: its single
    index feeds every output index.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        yield from broadcast(ctx, ctx.node.all_input_nodes, ctx.node)


@register(nn.PReLU)
class PReLURule(OpRule):
    """``nn.PReLU``: with one slope per channel the slope vector is part of the channel unit."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        yield from ctx.identity(x, ctx.node)
        if ctx.module.weight.numel() > 1:
            ch = 1 if len(ctx.shape(x)) > 1 else 0
            yield Couple(ctx.space(x, ch), ctx.param("weight", 0))
            yield Role(ctx.param("weight", 0), "norm")

    def update(self, actx: Any) -> None:
        actx.module.num_parameters = actx.module.weight.numel()


def _reduced_dims(dim: Any, ndim: int) -> Optional[set[int]]:
    """The reduced dims, or None for a reduction over all of them (``dim=None``, and ``dim=[]``,
    which ``sum``/``mean`` and their ATen overloads read as "every dim")."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    if isinstance(dim, int):
        return {dim % ndim}
    return {d % ndim for d in dim}


@register(torch.mean, torch.amax, torch.amin, torch.std, torch.var, torch.prod,
          torch.logsumexp, torch.norm, torch.max, torch.min, torch.argmax, torch.argmin,
          torch.nanmean, torch.all, torch.any, torch.sum, torch.nansum, torch.linalg.vector_norm,
          "mean", "amax", "amin", "std", "var", "prod", "logsumexp", "norm", "max", "min",
          "argmax", "argmin", "nanmean", "all", "any", "sum", "nansum")
class ReduceRule(OpRule):
    """Reductions over some dims (or all): the kept dims map to the output.

    A reduced dim is free where a zero entry changes nothing, so that reducing over a pruned
    dim is exact (a removed unit's entries are zero in the masked original): ``sum``,
    ``nansum``, ``any`` and p-norms with ``p >= 0`` (GAT's per-head logits
    ``(x * att).sum(-1)``, ``F.normalize``'s L2 norm over the channels). A ``mean`` is a sum
    divided by the count: its reduced dims are free as well, and ``update`` multiplies the
    pruned mean by ``new count / original count`` (an inserted ``mul`` node), so the pruned
    graph divides by the original size (hand-written RMSNorm ``x.pow(2).mean(-1)``, GAT's
    mean over heads). Other reductions mix the entries (``var``/``std`` subtract a mean that
    every entry shares, ``nanmean`` counts the non-NaN entries, a max may pick a zero), and the
    reduced dims are frozen with that reason. Where graph nodes or edges are units, a mean over
    them stays frozen (:meth:`graph_couple`): the graph is pruned as data, with no rewrite.
    ``max(x, dim)`` returns ``(values, indices)``; both items follow the kept dims.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        if sx is None:
            return
        name = op_name(ctx.node.target)
        dim_pos = 2 if name in _NORMS else 1
        schema = getattr(ctx.node.target, "_schema", None)
        if schema is not None and not any(a.name == "dim" for a in schema.arguments):
            dim = None  # aten.std.default(x, unbiased): every dim (its 2nd argument is no dim)
        else:
            dim = ctx.arg(dim_pos, "dim", ctx.node.kwargs.get("axis"))  # numpy's alias
        if name in ("max", "min") and isinstance(dim, fx.Node):  # torch.max(x, y): binary
            yield from broadcast(ctx, ctx.node.all_input_nodes, ctx.node)
            return
        reduced = _reduced_dims(ctx.value(dim), len(sx))
        if reduced is None and ctx.out_shape == sx and len(sx) > 0:  # nansum(x, []): no-op
            yield from ctx.identity(x, ctx.node)
            return
        neutral = _zero_neutral(ctx, name) or name == "mean"  # mean: rescaled by update()
        weights = neutral and _parameters_only(x)  # the walk only where it can matter
        if neutral and not weights:
            for d in range(len(sx)) if reduced is None else sorted(reduced):
                yield Couple(ctx.space(x, d), ctx.space(x, d))  # mentioned: free, tied to nothing
        else:
            why = (f"{name} reduces a tensor computed from parameters alone (a weight norm): "
                   f"removing entries would rescale the kept ones" if weights else
                   f"{name} mixes the entries it reduces: removing some would change the result")
            yield from ctx.freeze(x, why, None if reduced is None else sorted(reduced))
        if reduced is None:
            return
        keepdim = bool(ctx.value(ctx.arg(_keepdim_pos(ctx.node, name, dim_pos), "keepdim",
                                         False)))
        outs = [ctx.node] if ctx.out_shape is not None else []
        item_shapes = ctx.item_shapes(ctx.node) or []
        kept = [d for d in range(len(sx)) if d not in reduced]
        for k, d in enumerate(kept):
            od = d if keepdim else k
            for o in outs:
                yield Couple(ctx.space(x, d), ctx.space(o, od))
            for i, s in enumerate(item_shapes):
                if s is not None:
                    yield Couple(ctx.space(x, d), ctx.item(i, od))

    def graph_couple(self, ctx: CoupleContext) -> Iterator[Record]:
        """A mean over graph nodes or edges divides by their count, which pruning the graph
        (data, not the model: no rescaling is inserted) changes: those dims stay whole."""
        if op_name(ctx.node.target) != "mean":
            return
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        if sx is None:
            return
        reduced = _reduced_dims(ctx.value(_mean_dim(ctx.node)), len(sx))
        yield from ctx.freeze(x, "mean divides by the number of rows it reduces: removing "
                                 "some would change the result",
                              None if reduced is None else sorted(reduced))

    def update(self, actx: Any) -> None:
        """A mean over pruned dims: multiply the pruned result by ``new count / old count``,
        so that it divides the kept entries' sum by the original count (a ``mul`` node inserted
        right after the call; idempotent, as the apply pass may run twice)."""
        node = actx.node
        if op_name(node.target) != "mean" or _MEAN_SCALE in node.meta:
            return
        x = node.args[0] if node.args else node.kwargs.get("input")
        old = actx.old_shape(x) if isinstance(x, fx.Node) else None
        if old is None:
            return
        reduced = _reduced_dims(actx.value(_mean_dim(node)), len(old))
        factor = 1.0
        for d in range(len(old)) if reduced is None else sorted(reduced):
            lost = len(actx.dropped(actx.space(x, d)))
            if lost:
                factor *= (old[d] - lost) / old[d]
        if factor == 1.0:
            return
        graph = node.graph
        mul = aten.mul.Tensor if isinstance(node.target, torch._ops.OpOverload) else operator.mul
        with graph.inserting_after(node):
            scaled = graph.call_function(mul, (node, factor))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        node.meta[_MEAN_SCALE] = scaled


#: Set on a mean node once :meth:`ReduceRule.update` has inserted its rescaling ``mul``.
_MEAN_SCALE = "structprune_mean_scale"
aten = torch.ops.aten


def _mean_dim(node: fx.Node) -> Any:
    """The ``dim`` argument of a mean call (None for ``mean(x)`` / ``aten.mean.default``,
    whose second argument is a dtype)."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None and not any(a.name == "dim" for a in schema.arguments):
        return None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))


_NORMS = ("norm", "linalg_vector_norm")


def _zero_neutral(ctx: CoupleContext, name: str) -> bool:
    """Whether a zero entry leaves the reduction unchanged."""
    if name in ("sum", "nansum", "any"):
        return True
    if name in _NORMS:
        p = ctx.value(ctx.arg(1, "ord" if name == "linalg_vector_norm" else "p", 2))
        p = 2 if p is None else p
        return p == "fro" or (isinstance(p, (int, float)) and p >= 0)
    return False


def _parameters_only(x: Any) -> bool:
    """Whether ``x`` is computed from parameters and buffers alone (no model input reaches it):
    a weight's norm or sum (weight normalisation, a cosine classifier's ``w / w.norm(dim=1)``).
    Removing some of its entries changes the reduction of the kept ones, whereas zeroing the
    activations they meet does not, so its reduced dims stay frozen."""
    if not isinstance(x, fx.Node):
        return False
    seen, todo = set(), [x]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return False
        todo.extend(n.all_input_nodes)
    return True


def _keepdim_pos(node: fx.Node, name: str, dim_pos: int) -> int:
    """Where ``keepdim`` sits: right after ``dim``, except in ``std``/``var(x, dim, unbiased,
    keepdim)`` and ATen's ``var.dim``/``std.dim``; ``*.correction`` overloads take it by keyword."""
    if name in ("std", "var", "std_mean", "var_mean"):
        overload = getattr(node.target, "_overloadname", None)
        return 99 if overload == "correction" else dim_pos + 2
    return dim_pos + 1


@register(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, F.softmin,
          torch.softmax, torch.log_softmax, "softmax", "log_softmax", torch.cumsum, "cumsum")
class SoftmaxRule(OpRule):
    """Softmax-like ops along one dim: that dim is frozen, every other dim maps to itself.

    ``cumsum`` is the exception: entry ``j`` is the sum of entries ``0..j``, and a zero entry
    adds nothing, so its dim maps to itself too (removing units there is exact), unless the
    input is computed from parameters alone (the removed entries would leave the kept sums).
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        if sx is None:
            return
        dim = ctx.module.dim if ctx.module is not None else ctx.value(ctx.arg(1, "dim"))
        if dim is None:  # legacy implicit dim: be safe
            return
        dim %= len(sx)
        yield from ctx.identity(x, ctx.node, [d for d in range(len(sx)) if d != dim])
        if ctx.module is None and op_name(ctx.node.target) == "cumsum" \
                and ctx.out_shape == sx and not _parameters_only(x):
            yield from ctx.identity(x, ctx.node, [dim])

    def graph_couple(self, ctx: CoupleContext) -> Iterator[Record]:
        """Graph units: a cumsum over nodes or edges runs over the rows a pruned graph drops
        (as data, with no rewrite), so that dim stays whole there."""
        if ctx.module is not None or op_name(ctx.node.target) != "cumsum":
            return
        x, dim = ctx.arg(0, "input"), ctx.value(ctx.arg(1, "dim"))
        if ctx.shape(x) is not None and isinstance(dim, int):
            yield from ctx.freeze(x, "cumsum runs over the rows it sums: removing some would "
                                     "change the later sums", [dim % len(ctx.shape(x))])
