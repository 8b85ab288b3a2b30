"""The GraphModules structprune builds: lazy ones for analysis, plain ones for users.

:func:`analysis_module` wraps a captured graph without generating its code, :func:`plain_module`
turns one into an ordinary ``fx.GraphModule`` that pickles and scripts, and :func:`_drop_unused`
removes the pure nodes nobody reads from a captured graph.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .trace import Tracer


def analysis_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """A GraphModule for analysis, whose Python code is generated only when first needed.

    Tracing and slicing never run the generated code (they interpret the graph), so torch's
    lazy GraphModule saves a code generation and compile per model. Pruned models handed to
    users are made plain again (:func:`plain_module`): TorchScript does not take lazy ones.

    The graph forgets the :class:`Tracer` that built it (:func:`_forget_tracer`), so that this
    module and every copy or pruned version of it pickle like any GraphModule.
    """
    _forget_tracer(graph)
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # pragma: no cover - older torch
        return fx.GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)


def _forget_tracer(holder: Any) -> None:
    """Drop a :class:`Tracer` recorded on a graph or GraphModule (``_tracer_cls``).

    ``GraphModule.__reduce__`` stores only the generated code; unpickling re-traces that code
    with ``_tracer_cls()`` (no arguments) and every module a leaf. Our Tracer needs its rules,
    and re-tracing with it would not even be an identity: it decomposes an
    ``nn.MultiheadAttention`` that the user kept as a leaf. The generated code already holds
    every choice the Tracer made, so fx's own Tracer (the default when none is recorded)
    rebuilds exactly this graph.
    """
    cls = getattr(holder, "_tracer_cls", None)
    if isinstance(cls, type) and issubclass(cls, Tracer):
        holder._tracer_cls = None


def plain_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Make ``gm`` an ordinary ``fx.GraphModule`` (in place) with code for its current graph.

    A lazy module gets its own plain GraphModule class, as ``fx.GraphModule`` gives each
    instance, and then generates its code once; its submodules and tensors stay as they are.
    The result pickles, deep-copies and ``torch.save``-s like any GraphModule.
    """
    _forget_tracer(gm.graph)
    _forget_tracer(gm)
    if type(gm).__mro__[1] is not fx.GraphModule:
        name = type(gm).__name__
        gm.__class__ = type("GraphModuleImpl", (fx.GraphModule,), {})
        gm.__class__.__name__ = name
    # Unpickling names the rebuilt class after this (fx stores it only for torch.package).
    gm.__dict__["_graphmodule_cls_name"] = type(gm).__name__
    gm.recompile()
    return gm


def _drop_unused(graph: fx.Graph) -> None:
    """Remove pure nodes nobody reads (e.g. attention weights an MHA caller discards).

    In-place ops (``add_``, ``operator.iadd``) and module calls are kept whatever their users,
    and so are calls of functions from outside torch (an ``fx.wrap``-ed helper such as
    torchvision MViT's ``_add_shortcut``, which adds into its argument in place and returns
    nothing anyone reads: dropping it computed another model).
    """
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.users or n.op not in ("call_function", "call_method", "get_attr"):
                continue
            if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
                continue  # aten.add_.Tensor, aten.copy_.default, ...
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
            if name.endswith("_") or name.startswith("i") and name[1:] in _INPLACE_OPERATORS:
                continue
            if n.op == "call_function" and n.target in (operator.setitem, torch._assert):
                continue  # side effects: a write, an argument guard (graph/inputs.py)
            if n.op == "call_function" and not _known_pure(n.target):
                continue
            graph.erase_node(n)
            changed = True


def _known_pure(fn: Any) -> bool:
    """Whether ``fn`` is torch's, an operator or a builtin (no side effects but in-place ones,
    which :func:`_drop_unused` checks by name), not a user's or a library's own function."""
    if isinstance(fn, torch._ops.OpOverload):
        return True
    module = getattr(fn, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "operator", "_operator", "builtins", "math")


_INPLACE_OPERATORS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
                      "lshift", "rshift", "matmul", "concat"}
