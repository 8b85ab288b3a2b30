"""Sliced tensors and deep copies of modules that hold them.

:func:`sliced_tensors` slices every parameter, buffer and tensor attribute that loses indices under
a plan; :func:`copy_sliced_roots` deep-copies modules with those tensors already in place, each
weight copied once (sliced or whole, never copied and then sliced).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .rules import Space
from .scratch import temporary


def _owner(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    path, _, name = qualname.rpartition(".")
    return (root.get_submodule(path) if path else root), name


def _tensors_by_name(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``root`` by qualified name (tied tensors under each name)."""
    out = dict(root.named_parameters(remove_duplicate=False))
    out.update(root.named_buffers(remove_duplicate=False))
    return out


def _by_tensor(dropped: dict[Space, np.ndarray]) -> dict[str, list[tuple[int, np.ndarray]]]:
    """``{qualified tensor name: [(dim, dropped indices), ...]}`` over the parameter spaces."""
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for s, idx in dropped.items():
        if s.is_param and len(idx):
            out.setdefault(s.name, []).append((s.dim, idx))
    return out


def slice_like(t: torch.Tensor, dims: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """``t`` without the indices ``dims`` lists (``[(dim, dropped indices), ...]``), contiguous
    and owning its memory; ``t`` itself is not changed."""
    new = t.detach()
    steps = sorted(dims, key=lambda d: d[0])  # outer dim first: fewer bytes
    for k, (dim, idx) in enumerate(steps):
        mask = np.ones(new.shape[dim], dtype=bool)
        mask[idx] = False
        keep = torch.as_tensor(np.flatnonzero(mask), dtype=torch.long, device=t.device)
        if k == 0 and len(steps) == 2:  # the halfway copy goes to scratch space
            shape = list(new.shape)
            shape[dim] = len(keep)
            new = torch.index_select(new, dim, keep, out=temporary(shape, new.dtype, new.device))
        else:
            new = new.index_select(dim, keep)
    return new.contiguous()


def sliced_tensors(root: nn.Module, dropped: dict[Space, np.ndarray]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{qualified name: (old tensor, new sliced tensor)}`` for every parameter, buffer or
    tensor attribute of ``root`` that loses indices."""
    named = _tensors_by_name(root)
    out = {}
    for qual, dims in _by_tensor(dropped).items():
        t = named[qual] if qual in named else getattr(*_owner(root, qual))
        new = slice_like(t, dims)
        out[qual] = (t, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(
            t, nn.Parameter) else new)
    return out


def copy_sliced(gm: fx.GraphModule, dropped: dict[Space, np.ndarray]) -> fx.GraphModule:
    """A deep copy of ``gm`` in which the tensors that lose indices are already sliced."""
    return copy_sliced_roots([gm], sliced_tensors(gm, dropped))[0]


def copy_sliced_roots(roots: list[nn.Module], sliced: dict[str, tuple[torch.Tensor, torch.Tensor]]
                      ) -> list[nn.Module]:
    """Deep copies of ``roots``, made together (a module or tensor they share stays shared),
    in which every tensor ``sliced`` lists (``{name: (old, new)}``) is its sliced version.

    The sliced tensors, clones of the others and plain copies of ordinary modules are handed to
    ``deepcopy`` through its memo, so each weight is copied once (sliced or whole, never copied
    and then sliced) and the module tree costs little more than its dictionaries. A sliced
    tensor is replaced wherever it is held: tied weights, lists, plain attributes.
    """
    memo: dict[int, Any] = {id(old): new for old, new in sliced.values()}
    tensors = {id(t): t for root in roots for t in _tensors_by_name(root).values()}
    storages: dict[int, int] = {}  # tensors per storage: views must keep sharing (deepcopy)
    for t in tensors.values():
        storages[t.untyped_storage().data_ptr()] = storages.get(
            t.untyped_storage().data_ptr(), 0) + 1
    for t in tensors.values():
        if (id(t) not in memo and _plain_tensor(t)
                and storages[t.untyped_storage().data_ptr()] == 1):
            memo[id(t)] = _clone(t)
    for root in roots:
        for m in root.modules():
            if m is not root or not isinstance(m, fx.GraphModule):
                _copy_module(m, memo)
    out = []
    for root in roots:
        target = copy.deepcopy(root, memo)
        if isinstance(root, fx.GraphModule):
            target.__class__.__name__ = type(root).__name__  # deepcopy drops the model's name
        out.append(target)
    return out


_ATOMIC = (int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
           torch.memory_format)


def _atomic(v: Any) -> bool:
    return isinstance(v, _ATOMIC) or (type(v) is tuple and all(_atomic(x) for x in v))


def _plain_tensor(t: torch.Tensor) -> bool:
    """A leaf tensor that ``clone`` copies exactly as ``deepcopy`` would: no subclass or extra
    attributes, contiguous, the whole of its storage."""
    return (type(t) in (torch.Tensor, nn.Parameter) and not t.__dict__ and t.grad_fn is None
            and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _clone(t: torch.Tensor) -> torch.Tensor:
    c = t.detach().clone()
    if isinstance(t, nn.Parameter):
        return nn.Parameter(c, requires_grad=t.requires_grad)
    return c.requires_grad_(t.requires_grad)


def _copy_module(m: nn.Module, memo: dict[int, Any]) -> Any:
    """What ``deepcopy(m, memo)`` returns, built by copying dictionaries where that is the same.

    Modules with their own copy or pickling hooks are left to ``deepcopy``; every attribute that
    is not an immutable value goes through ``deepcopy`` with the shared memo, so aliasing
    between modules and tensors is kept exactly as ``deepcopy`` keeps it.
    """
    if id(m) in memo:
        return memo[id(m)]
    cls = type(m)
    if (getattr(cls, "__deepcopy__", None) is not None or cls.__reduce_ex__ is not object.__reduce_ex__
            or cls.__reduce__ is not object.__reduce__ or cls.__getstate__ is not nn.Module.__getstate__
            or cls.__setstate__ is not nn.Module.__setstate__):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state = {}
    for k, v in m.__dict__.items():
        if _atomic(v):
            state[k] = v
        elif k == "_modules":
            state[k] = type(v)((n, None if c is None else _copy_module(c, memo)) for n, c in v.items())
        elif k in ("_parameters", "_buffers") and type(v) in (dict, OrderedDict):
            state[k] = type(v)((n, memo[id(t)] if id(t) in memo else copy.deepcopy(t, memo))
                               for n, t in v.items())
        elif k.startswith("_") and type(v) in (dict, OrderedDict, set) and not v:  # hooks
            state[k] = type(v)()
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__dict__.update(state)
    return new
