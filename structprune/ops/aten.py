"""ATen overloads, the ops of graphs captured by ``torch.export`` (``aten.conv2d.default``).

Models that ``torch.fx`` cannot trace (they branch on shapes) are captured with
``torch.export.export(strict=False)``; its graph calls ATen overloads instead of modules and
``torch`` functions. Where an overload takes its arguments like an op we already have a rule for
(``aten.relu.default`` like ``torch.relu``, ``aten.linear.default`` like ``F.linear``), it is
registered as one more key of that rule. The overloads whose arguments differ get small rules
here: ``aten.convolution`` and ``aten.conv_transpose*``, the batch norms (some return a tuple),
``aten.addmm``, ``aten.embedding``, ``aten.slice.Tensor``, ``aten.select.int``,
``aten.narrow`` and the dim-naming ``aten.flip``/``aten.roll``/``aten.index_select``.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..rules import (Address, Couple, CoupleContext, Freeze, OpRule, Record, Role, Space, aten_ops, extend,
                     node_arg, op_name, register)
from .attention import SDPARule
from .conv import FunctionalConvRule, _conv_macs, conv_couplings, update_groups
from .elementwise import BroadcastRule, ReduceRule, SoftmaxRule, TypeAsRule, UnaryRule
from .linear import EinsumRule, FunctionalLinearRule, MatmulRule
from .norm import (FunctionalGroupNormRule, LayerNormRule, functional_stats, reduced_dims,
                   stat_couplings)
from .pool import (ChannelShuffleRule, InterpolateRule, PadRule, PixelShuffleRule, Pool1dRule,
                   Pool2dRule, Pool3dRule)
from .shape import (ArangeRule, CatRule, ExpandRule, FactoryRule, PermuteRule, RepeatRule,
                    ReshapeRule, ShapeQueryRule, SplitRule, StackRule, size_source,
                    traced_slice_couplings)

aten = torch.ops.aten


_ops = aten_ops


# --- element-wise --------------------------------------------------------------------------------
_UNARY = [f"{n}.default" for n in (
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "hardtanh", "hardtanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "mish", "mish_",
    "softplus", "relu6", "log_sigmoid", "hardshrink", "softshrink", "threshold", "exp", "log",
    "abs", "neg", "sqrt", "rsqrt", "square", "sin", "cos", "erf", "sign", "reciprocal", "log1p",
    "expm1", "floor", "ceil", "round", "trunc", "frac", "logit", "nan_to_num", "clamp",
    "clamp_", "clamp_min", "clamp_max", "clip", "dropout", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "clone", "contiguous", "alias", "detach", "detach_",
    "lift_fresh_copy", "_to_copy", "logical_not", "bitwise_not", "isnan", "isinf", "zeros_like",
    "ones_like", "full_like",
)] + ["clamp.Tensor", "pow.Tensor_Scalar", "pow_.Scalar", "to.dtype", "to.dtype_layout", "to.device"]
extend(UnaryRule, *_ops(*_UNARY))

_BINARY = [f"{n}.{o}" for n in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
                                "rsub", "eq", "ne", "lt", "le", "gt", "ge", "remainder", "fmod",
                                "floor_divide", "logical_and", "logical_or", "bitwise_and",
                                "bitwise_or") for o in ("Tensor", "Scalar")]
_BINARY += ["pow.Tensor_Tensor", "pow.Scalar", "div.Tensor_mode", "maximum.default",
            "minimum.default", "max.other", "min.other", "where.self", "where.ScalarOther",
            "where.ScalarSelf", "where.Scalar", "lerp.Scalar", "lerp.Tensor", "addcmul.default",
            "addcdiv.default", "masked_fill.Scalar", "masked_fill.Tensor", "masked_fill_.Scalar",
            "masked_fill_.Tensor", "hypot.default", "atan2.default", "fmax.default",
            "fmin.default", "copysign.Tensor"]
extend(BroadcastRule, *_ops(*_BINARY))
extend(TypeAsRule, *_ops("type_as.default", "to.other"))

extend(ReduceRule, *_ops(
    "sum.dim_IntList", "sum.default", "nansum.default", "mean.dim", "amax.default", "amin.default", "max.dim", "min.dim",
    "argmax.default", "argmin.default", "var.dim", "var.correction", "std.dim",
    "std.correction", "var_mean.correction", "std_mean.correction", "prod.dim_int",
    "logsumexp.default", "norm.ScalarOpt_dim", "linalg_vector_norm.default",
    "nanmean.default", "any.dim", "any.dims", "all.dim", "all.dims", "mean.default",
    "std.default", "var.default", "max.default", "min.default", "prod.default", "any.default",
    "all.default"))
extend(SoftmaxRule, *_ops("softmax.int", "_softmax.default", "log_softmax.int",
                          "_log_softmax.default", "cumsum.default"))

# --- linear, attention ---------------------------------------------------------------------------
extend(FunctionalLinearRule, *_ops("linear.default"))
extend(MatmulRule, *_ops("matmul.default", "mm.default", "bmm.default"))
extend(EinsumRule, *_ops("einsum.default"))
extend(SDPARule, *_ops("scaled_dot_product_attention.default"))

# --- conv, norms, pooling ------------------------------------------------------------------------
# aten.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups) is F.conv{1,2,3}d.
extend(FunctionalConvRule, *_ops("conv1d.default", "conv2d.default", "conv3d.default",
                                 "conv1d.padding", "conv2d.padding", "conv3d.padding"))
extend(LayerNormRule, *_ops("layer_norm.default", "rms_norm.default"))
extend(FunctionalGroupNormRule, *_ops("group_norm.default"))
extend(Pool1dRule, *_ops("max_pool1d.default", "avg_pool1d.default", "adaptive_avg_pool1d.default",
                         "adaptive_max_pool1d.default", "max_pool1d_with_indices.default"))
extend(Pool2dRule, *_ops("max_pool2d.default", "avg_pool2d.default", "adaptive_avg_pool2d.default",
                         "_adaptive_avg_pool2d.default", "adaptive_max_pool2d.default",
                         "max_pool2d_with_indices.default"))
extend(Pool3dRule, *_ops("max_pool3d.default", "avg_pool3d.default", "adaptive_avg_pool3d.default",
                         "_adaptive_avg_pool3d.default", "adaptive_max_pool3d.default",
                         "max_pool3d_with_indices.default"))
extend(InterpolateRule, *_ops(*[f"upsample_{m}.{o}" for m in (
    "nearest1d", "nearest2d", "nearest3d", "linear1d", "bilinear2d", "bicubic2d", "trilinear3d",
    "_nearest_exact1d", "_nearest_exact2d", "_nearest_exact3d") for o in ("vec", "default")]))
extend(PadRule, *_ops("pad.default", "constant_pad_nd.default", "reflection_pad1d.default",
                      "reflection_pad2d.default", "reflection_pad3d.default",
                      "replication_pad1d.default", "replication_pad2d.default",
                      "replication_pad3d.default", "circular_pad1d.default",
                      "circular_pad2d.default", "circular_pad3d.default"))
extend(PixelShuffleRule, *_ops("pixel_shuffle.default", "pixel_unshuffle.default"))
extend(ChannelShuffleRule, *_ops("channel_shuffle.default", "native_channel_shuffle.default"))

# --- shape ops -----------------------------------------------------------------------------------
extend(ReshapeRule, *_ops("view.default", "reshape.default", "_unsafe_view.default",
                          "flatten.using_ints", "unflatten.int", "squeeze.dim", "squeeze.dims",
                          "squeeze.default", "unsqueeze.default", "view_as.default",
                          "reshape_as.default", "ravel.default"))
# The meta-perm trick calls the overload itself on a meta tensor with the node's other args.
extend(PermuteRule, *_ops("permute.default", "transpose.int", "t.default", "movedim.int",
                          "movedim.intlist", "swapaxes.default", "swapdims.default",
                          "numpy_T.default", "mT.default", "adjoint.default"))
extend(ShapeQueryRule, *_ops("sym_size.int", "sym_numel.default", "sym_stride.int", "size.int",
                             "dim.default", "numel.default", "sym_storage_offset.default"))
extend(CatRule, *_ops("cat.default", "concat.default", "concatenate.default"))
extend(StackRule, *_ops("stack.default"))
extend(SplitRule, *_ops("split.Tensor", "split.sizes", "split_with_sizes.default",
                        "chunk.default", "unbind.int", "tensor_split.sections",
                        "tensor_split.indices"))
extend(ExpandRule, *_ops("expand.default", "expand_as.default", "broadcast_to.default"))
extend(RepeatRule, *_ops("repeat.default", "tile.default", "repeat_interleave.self_int",
                          "repeat_interleave.self_Tensor"))
extend(ArangeRule, *_ops("arange.default", "arange.start", "arange.start_step"))
extend(FactoryRule, *_ops("zeros.default", "ones.default", "full.default", "new_zeros.default",
                          "new_ones.default", "new_full.default", "new_empty.default",
                          "empty.memory_format"))


_arg = node_arg


# --- new rules -----------------------------------------------------------------------------------
@register(*_ops("convolution.default", "_convolution.default"))
class AtenConvolutionRule(OpRule):
    """``aten.convolution(x, weight, bias, stride, padding, dilation, transposed,
    output_padding, groups)``, plain or transposed."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
        sw = ctx.shape(w)
        if sw is None:
            return
        transposed = bool(ctx.value(ctx.arg(6, "transposed", False)))
        groups = int(ctx.value(ctx.arg(8, "groups", 1)))
        bias = ctx.space(b, 0) if ctx.shape(b) is not None else None
        yield from conv_couplings(ctx, x, lambda d: ctx.space(w, d), bias, groups, len(sw) - 2,
                                  transposed=transposed)

    def update(self, actx: Any) -> None:
        update_groups(actx, 8)

    def macs(self, mctx: Any) -> int:
        n = mctx.node
        return _conv_macs(mctx, mctx.shape(n.args[1]) or (0,),
                          transposed=bool(_arg(n, 6, "transposed", False)))


@register(*_ops("conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input"),
          F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
class AtenConvTransposeRule(FunctionalConvRule):
    """``aten.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups,
    dilation)`` (also ``F.conv_transpose2d``'s order); the weight is ``[C_in, C_out/g, *k]``."""

    transposed = True


_BN_ROLES = ("norm", "bias", "stat", "stat")


@register(*_ops("batch_norm.default", "instance_norm.default"))
class AtenBatchNormRule(OpRule):
    """``aten.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps,
    cudnn)`` and ``aten.instance_norm`` (same order, ``use_input_stats`` for ``training``):
    per-channel weight, bias and statistics; the dims that batch or instance statistics reduce
    over stay whole (see :class:`~structprune.ops.norm.FunctionalBatchNormRule`)."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        is_instance = ctx.node.target is aten.instance_norm.default
        kind = functional_stats(ctx, is_instance, 5, "use_input_stats" if is_instance
                                else "training", 3)
        yield from _bn_body(ctx, x, kind)
        yield from _bn_params(ctx, x)

    def macs(self, mctx: Any) -> int:
        return math.prod(mctx.shape(mctx.node) or (0,))


def _bn_body(ctx: CoupleContext, x: Any, kind: str, item: bool = False) -> Iterator[Record]:
    """Couple ``x`` to the output (item 0 of it when ``item``) except the reduced dims."""
    sx = ctx.shape(x)
    ch = 1 if len(sx) > 1 else 0
    reduced = set(reduced_dims(len(sx), ch, kind))
    reason = f"{describe_target(ctx)} computes {kind} statistics over this dim"
    if not item:
        yield from stat_couplings(ctx, x, ch, sorted(reduced), reason)
        return
    for d in range(len(sx)):
        if d in reduced:
            yield Freeze(ctx.space(x, d), reason)
            yield Freeze(ctx.item(0, d), reason)
        else:
            yield Couple(ctx.space(x, d), ctx.item(0, d))


def describe_target(ctx: CoupleContext) -> str:
    return f"aten.{ctx.node.target.__name__}"


def _bn_params(ctx: CoupleContext, x: Any) -> Iterator[Record]:
    ch = ctx.space(x, 1 if len(ctx.shape(x)) > 1 else 0)
    c = ctx.shape(x)[ch.dim]
    for k, role in enumerate(_BN_ROLES):
        a = ctx.arg(k + 1, ("weight", "bias", "running_mean", "running_var")[k])
        s = ctx.shape(a)
        if s is not None and len(s) == 1 and s[0] == c:
            yield Couple(ch, ctx.space(a, 0))
            yield Role(ctx.space(a, 0), role)


@register(*_ops("_native_batch_norm_legit_no_training.default", "_native_batch_norm_legit.default",
                "native_batch_norm.default", "_native_batch_norm_legit.no_stats"))
class AtenNativeBatchNormRule(OpRule):
    """The batch norms that return ``(out, save_mean, save_invstd)``: item 0 is the input's
    shape; the saved statistics (per channel, or empty in eval) follow the channel. In
    training (``training`` argument true; ``no_stats`` always) the batch and spatial dims,
    which the statistics reduce over, stay whole."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx, items = ctx.shape(x), ctx.item_shapes(ctx.node)
        if sx is None or not items or items[0] is None:
            return
        t = ctx.node.target
        if t is aten._native_batch_norm_legit_no_training.default:
            kind = "running"
        elif t is aten._native_batch_norm_legit.no_stats:
            kind = "batch"
        else:
            kind = "batch" if bool(ctx.value(ctx.arg(5, "training", False))) else "running"
        yield from _bn_body(ctx, x, kind, item=True)
        yield from _bn_params(ctx, x)
        ch = ctx.space(x, 1 if len(sx) > 1 else 0)
        for k, s in enumerate(items[1:], 1):
            if s is not None and len(s) == 1 and s[0] == sx[ch.dim]:
                yield Couple(ch, ctx.item(k, 0))

    def macs(self, mctx: Any) -> int:
        return math.prod(mctx.shape(mctx.node.args[0]) or (0,))


@register(*_ops("prelu.default", "_prelu_kernel.default"))
class AtenPReLURule(OpRule):
    """``aten.prelu(x, weight)``: a per-channel slope vector is part of the channel unit."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
        sx, sw = ctx.shape(x), ctx.shape(w)
        yield from ctx.identity(x, ctx.node)
        if sw is not None and len(sw) == 1 and sw[0] > 1:
            yield Couple(ctx.space(x, 1 if len(sx) > 1 else 0), ctx.space(w, 0))
            yield Role(ctx.space(w, 0), "norm")


@register(*_ops("addmm.default"))
class AddmmRule(OpRule):
    """``aten.addmm(bias, x, w_t)`` = ``bias + x @ w_t``: a linear layer with its weight
    transposed; the bias broadcasts over the rows."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        from .elementwise import broadcast

        bias, a, b = ctx.arg(0, "input"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
        if ctx.shape(a) is None or ctx.shape(b) is None:
            return
        yield Couple(ctx.space(a, 0), ctx.out(0))
        yield Couple(ctx.space(a, 1), ctx.space(b, 0))
        yield Couple(ctx.space(b, 1), ctx.out(1))
        yield from broadcast(ctx, [bias], ctx.node)

    def macs(self, mctx: Any) -> int:
        a = mctx.node.args[1]
        return math.prod(mctx.shape(mctx.node) or (0,)) * (mctx.shape(a) or (0, 0))[1]


@register(*_ops("embedding.default"))
class AtenEmbeddingRule(OpRule):
    """``aten.embedding(weight, indices, ...)``: the embedding dim = weight columns."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        w, idx = ctx.arg(0, "weight"), ctx.arg(1, "indices")
        si = ctx.shape(idx)
        if si is None or ctx.shape(w) is None:
            return
        yield from ctx.identity(idx, ctx.node, range(len(si)))
        yield Couple(ctx.out(-1), ctx.space(w, 1))
        yield Role(ctx.space(w, 1), "out")


def _slice_bounds(ctx_or_actx: Any, node: fx.Node, size: int) -> Optional[tuple[int, int]]:
    """``(start, stop)`` of a unit-step ``aten.slice``/``aten.narrow`` on a dim of ``size``."""
    v = ctx_or_actx.value
    if node.target is aten.narrow.default:
        start = v(_arg(node, 2, "start", 0))
        start = start % size if start < 0 else start
        return start, start + v(_arg(node, 3, "length"))
    start, end, step = (v(_arg(node, 2, "start", None)), v(_arg(node, 3, "end", None)),
                        v(_arg(node, 4, "step", 1)))
    start, stop, step = slice(start, end, step).indices(size)
    return (start, max(stop, start)) if step == 1 else None


@register(*_ops("slice.Tensor", "narrow.default"))
class AtenSliceRule(OpRule):
    """``aten.slice(x, dim, start, end, step)`` and ``aten.narrow(x, dim, start, length)``.

    As for ``x[a:b]``: the kept range maps to the output, indices outside it are read by
    nothing (and so removable); after pruning, ``start``/``end`` move to the kept indices.
    Steps other than 1 leave the dim whole.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        if sx is None or ctx.out_shape is None:
            return
        dim = ctx.value(ctx.arg(1, "dim", 0)) % len(sx)
        yield from ctx.identity(x, ctx.node, [d for d in range(len(sx)) if d != dim])
        if any(isinstance(a, fx.Node) for a in ctx.node.args[2:]):
            # ``pos[:, :x.size(1)]``: the bound stays symbolic (see traced_slice_couplings)
            if ctx.node.target is aten.narrow.default:
                yield Freeze(ctx.space(x, dim), f"narrowed at a position or length computed "
                             f"in the graph: another input size reads other entries")
                return
            yield from traced_slice_couplings(ctx, x, dim, dim, None,
                                              stop=_arg(ctx.node, 3, "end", None),
                                              start=_arg(ctx.node, 2, "start", None))
            return
        bounds = _slice_bounds(ctx, ctx.node, sx[dim])
        if bounds is None:
            return
        start, stop = bounds
        yield Couple(ctx.space(x, dim), ctx.out(dim), np.arange(start, stop),
                     np.arange(stop - start))

    def size_args(self, node: fx.Node) -> set:
        """``aten.slice``'s ``end`` where it is a tensor's size itself and ``start`` is 0 or
        None: :func:`~structprune.ops.shape.traced_slice_couplings` ties the sliced dim to
        that size's dim (or freezes both)."""
        if node.target is aten.narrow.default:
            return set()
        start, end = _arg(node, 2, "start", None), _arg(node, 3, "end", None)
        step = _arg(node, 4, "step", 1)
        if isinstance(start, fx.Node) or start not in (None, 0) or step != 1 \
                or size_source(end) is None:
            return set()
        return {3, "end"}

    def update(self, actx: Any) -> None:
        node = actx.node
        x = node.args[0]
        sx = actx.old_shape(x)
        dim = actx.value(_arg(node, 1, "dim", 0)) % len(sx)
        dropped = actx.dropped(Space(x.name, dim))
        if not len(dropped) or any(isinstance(a, fx.Node) for a in node.args[2:]):
            return  # a traced bound is the pruned size itself (traced_slice_couplings)
        start, stop = _slice_bounds(actx, node, sx[dim])
        new_start = start - int(np.sum(dropped < start))
        kept = (stop - start) - int(np.sum((dropped >= start) & (dropped < stop)))
        if node.target is aten.narrow.default:
            node.args = (x, _arg(node, 1, "dim", 0), new_start, kept)
        else:
            # a slice to the end stays one (its dim may be an open size: batch x heads)
            end = _arg(node, 3, "end", None)
            to_end = end is None or (isinstance(end, int) and end > sx[dim])
            node.args = (x, _arg(node, 1, "dim", 0), new_start,
                         end if to_end else new_start + kept, 1)
        node.kwargs = {}


@register(*_ops("select.int"))
class AtenSelectRule(OpRule):
    """``aten.select(x, dim, index)`` (``x[:, i]``): the index taken stays, the dim goes."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        if sx is None or ctx.out_shape is None:
            return
        dim = ctx.value(ctx.arg(1, "dim")) % len(sx)
        index = ctx.value(ctx.arg(2, "index")) % sx[dim]
        for d in range(len(sx)):
            if d != dim:
                yield Couple(ctx.space(x, d), ctx.out(d if d < dim else d - 1))
        yield Freeze(ctx.space(x, dim), "", idx=[index])

    def update(self, actx: Any) -> None:
        node = actx.node
        x = node.args[0]
        sx = actx.old_shape(x)
        dim = actx.value(_arg(node, 1, "dim")) % len(sx)
        dropped = actx.dropped(Space(x.name, dim))
        if len(dropped):
            index = actx.value(_arg(node, 2, "index")) % sx[dim]
            node.args = (x, _arg(node, 1, "dim"), index - int(np.sum(dropped < index)))
            node.kwargs = {}


@register(*_ops("flip.default", "roll.default", "index_select.default"), torch.index_select,
          "index_select", torch.flip, "flip", torch.roll, "roll")
class AlongDimsRule(OpRule):
    """Ops that move or pick entries only along the dims they name (``flip(x, dims)``,
    ``roll(x, shifts, dims)``, ``index_select(x, dim, index)``): those dims stay whole, the
    others map to themselves."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        x = ctx.arg(0, "input")
        sx = ctx.shape(x)
        if sx is None or ctx.out_shape is None or len(sx) != len(ctx.out_shape):
            return
        name = op_name(ctx.node.target)
        if name == "index_select":
            dims = ctx.value(ctx.arg(1, "dim"))
        elif name == "roll":
            dims = ctx.value(ctx.arg(2, "dims", []))
            if not dims:  # roll over the flattened tensor mixes every dim
                return
        else:
            dims = ctx.value(ctx.arg(1, "dims"))
        dims = {d % len(sx) for d in ([dims] if isinstance(dims, int) else dims)}
        if name == "index_select":
            index = ctx.arg(2, "index")
            yield Address(ctx.space(x, min(dims)), f"rows along dim {min(dims)} are addressed by "
                          f"the index values of {ctx.node.name}",
                          index=index.name if isinstance(index, fx.Node) else None)
        yield from ctx.identity(x, ctx.node, [d for d in range(len(sx)) if d not in dims])

    def graph_couple(self, ctx: CoupleContext) -> Iterator[Record]:
        """``index_select``: index entry k is the result's row k along ``dim``."""
        if op_name(ctx.node.target) != "index_select" or ctx.out_shape is None:
            return
        dim, index = ctx.value(ctx.arg(1, "dim")), ctx.arg(2, "index")
        si = ctx.shape(index)
        if isinstance(dim, int) and si is not None and len(si) == 1:
            dim %= len(ctx.out_shape)
            if si[0] == ctx.out_shape[dim]:
                yield Couple(ctx.space(index, 0), ctx.out(dim))
