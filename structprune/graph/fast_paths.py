"""Outputs on the meta device without torch's (slow) meta decompositions.

Shape records and the slicing pass run graphs on meta tensors; for the most common modules
(convolutions, linears, norms, activations) and functions (arithmetic, ``cat``) the output's shape
and dtype follow from a formula, so these return an empty tensor of that shape, or None where
torch should decide (and raise, if the call is invalid).
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn as nn

from ..rules import registered


def _like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` on the meta device without its Python decomposition."""
    if x.is_contiguous():
        return x.new_empty(x.shape)
    return torch.empty_like(x)


def _meta_fast_path(mod: nn.Module, args: Any, kwargs: Any) -> Any:
    """Output of common modules on meta inputs without their (slow) meta decompositions."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    cls = type(mod)
    rule = registered(cls)
    if (rule is not None and rule.preserves_shape) or cls in _SAME_SHAPE:
        return _like(x)
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        out = _conv_shape(mod, x)
        if out is not None:
            return x.new_empty(out)
        b = mod.bias.to("meta") if mod.bias is not None else None
        return mod._conv_forward(x, mod.weight.to("meta"), b)
    if cls is nn.Linear:
        w, b = mod.weight, mod.bias
        if (x.dim() >= 1 and x.shape[-1] == w.shape[1] and w.dtype == x.dtype
                and (b is None or tuple(b.shape) == (w.shape[0],)) and x.is_contiguous()):
            return x.new_empty((*x.shape[:-1], w.shape[0]))
        b = b.to("meta") if b is not None else None
        return torch.nn.functional.linear(x, w.to("meta"), b)
    return None


def _conv_shape(mod: nn.Module, x: torch.Tensor) -> Optional[tuple[int, ...]]:
    """Output shape of a batched, contiguous, consistent ``nn.ConvNd`` call by its formula, or
    None where the meta kernel should decide (and raise, if the call is invalid)."""
    w, b = mod.weight, mod.bias
    nd = w.dim() - 2
    if (x.dim() != nd + 2 or x.shape[1] != w.shape[1] * mod.groups or w.dtype != x.dtype
            or not x.is_contiguous() or not w.is_contiguous()
            or (b is not None and tuple(b.shape) != (w.shape[0],))):
        return None
    if mod.padding == "same" or mod.padding_mode != "zeros":  # reflect pads have own limits
        return None
    pad = (0,) * nd if mod.padding == "valid" else tuple(mod.padding)
    spatial = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
        x.shape[2:], pad, mod.dilation, w.shape[2:], mod.stride))
    if any(n <= 0 for n in spatial):
        return None
    return (x.shape[0], w.shape[0], *spatial)


_SAME_SHAPE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU)
_F = torch.nn.functional
# Shape- and dtype-preserving on floating tensors whatever their keyword arguments say.
_META_UNARY = {_F.relu, torch.relu, torch.sigmoid, torch.tanh, _F.gelu, _F.silu, _F.hardswish,
               _F.hardsigmoid, _F.relu6, _F.dropout, "relu", "sigmoid", "tanh"}
_META_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                torch.mul, torch.div, "add", "sub", "mul", "div"}
_META_CAT = {torch.cat, torch.concat, torch.concatenate}


def _meta_cat(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``torch.cat`` of contiguous meta tensors of one dtype and rank whose other dims agree."""
    xs = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if (len(args) > 2 or set(kwargs) - {"tensors", "dim"} or not isinstance(xs, (list, tuple))
            or not xs or not isinstance(dim, int)):
        return None
    first = xs[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return None
    nd = first.dim()
    d = dim % nd if -nd <= dim < nd else None
    if d is None:
        return None
    shape = list(first.shape)
    shape[d] = 0
    for x in xs:
        if (not isinstance(x, torch.Tensor) or not x.is_meta or x.dtype != first.dtype
                or x.dim() != nd or not x.is_contiguous()
                or any(x.shape[k] != first.shape[k] for k in range(nd) if k != d)):
            return None
        shape[d] += x.shape[d]
    return first.new_empty(shape)


def _meta_elementwise(target: Any, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Output of plain float arithmetic on contiguous meta tensors, or None (take the slow path).

    With every tensor operand contiguous and of one floating dtype (Python numbers allowed),
    the result is a contiguous tensor of that dtype and the broadcast shape.
    """
    try:
        if target in _META_CAT:
            return _meta_cat(args, kwargs)
        if target not in _META_UNARY and target not in _META_BINARY:
            return None
    except TypeError:  # an unhashable target
        return None
    if target in _META_UNARY:
        x = args[0] if len(args) == 1 else None
        if (isinstance(x, torch.Tensor) and x.is_meta and x.is_floating_point()
                and x.is_contiguous()):
            return x.new_empty(x.shape)
        return None
    if kwargs or len(args) != 2:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(not isinstance(a, (torch.Tensor, int, float)) or isinstance(a, bool)
                          for a in args):
        return None
    dtype = tensors[0].dtype
    if not dtype.is_floating_point or any(
            t.dtype != dtype or not t.is_meta or not t.is_contiguous() for t in tensors):
        return None
    shape = tensors[0].shape if len(tensors) == 1 or tensors[0].shape == tensors[1].shape \
        else torch.broadcast_shapes(tensors[0].shape, tensors[1].shape)
    return tensors[0].new_empty(shape)
