"""Whether a model's own ``forward``, run on its pruned modules, computes the pruned graph.

A pruned copy of the model's own class (``apply_copy.py``) and a model pruned in place
(``apply_in_place.py``) are only correct when it does; :func:`own_forward_differs` says why not.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .apply import _same
from .graph.inputs import concrete_args, specialise
from .graph.modules import _drop_unused, analysis_module
from .graph.shapes import ShapeInterpreter, placeholder_values
from .graph.trace import Tracer
from .modes import eval_mode
from .oracle import flatten_outputs
from .rules import module_rule


def own_forward_differs(model: nn.Module, gm: fx.GraphModule, graph: Any,
                         example_inputs: tuple[tuple, dict]) -> str:
    """Why ``model`` (its own forward, on the pruned modules) does not compute what the pruned
    graph ``gm`` computes, or ``""`` when it does.

    Exact and cheap where it can be: ``model`` is traced again, the same way, and must give
    ``gm``'s graph node for node (a forward that reads a pruned attribute, branches on one or
    bakes one into a literal traces to another graph). A module the tracer replaces by a
    functional equivalent (a rule that ``decomposes``: ``nn.MultiheadAttention``, the
    transformer modules, ``nn.LSTM``/``GRU``/``RNN``) runs its own forward in the model, so
    there the outputs are compared instead, on the example inputs and random ones like them.
    """
    if not any(getattr(module_rule(m, graph.rules), "decomposes", False)
               for m in model.modules()):
        return _retrace_differs(model, gm, graph, example_inputs)
    for inputs in (example_inputs, _random_like(example_inputs)):
        problem = _outputs_differ(model, gm, inputs, graph.traced_training)
        if problem:
            return problem
    return ""


def _retrace_differs(model: nn.Module, gm: fx.GraphModule, graph: Any,
                     example_inputs: tuple[tuple, dict]) -> str:
    args, kwargs = example_inputs
    concrete = concrete_args(model, args, kwargs)
    try:
        tracer = Tracer(graph.rules, graph._leaf_modules)
        again = tracer.trace(model, concrete_args=concrete or None)
        n_nodes = len(again.nodes)
        _drop_unused(again)  # as the capture did
        dead = len(again.nodes) != n_nodes
        again_gm = analysis_module(tracer.root, again, type(model).__name__)
        specialise(again_gm, model, args, kwargs, concrete)
    except Exception as exc:  # the pruned model's forward does not trace any more
        return f"fails to trace ({type(exc).__name__})"
    if not same_graph(again_gm.graph, gm.graph):
        return ("traces to another graph than the pruned one (it reads something the graph "
                "fixed, such as a module attribute)")
    return _dead_code_fails(model, graph, example_inputs) if dead else ""


def _dead_code_fails(model: nn.Module, graph: Any, example_inputs: tuple[tuple, dict]) -> str:
    """The analysis graph leaves out computations whose results nothing reads; the model's own
    forward still runs them. Run the whole forward, as traced, on the meta device (shapes
    only): a dead computation that no longer fits the pruned sizes fails here."""
    args, kwargs = example_inputs
    try:
        raw = Tracer(graph.rules, graph._leaf_modules).trace(
            model, concrete_args=concrete_args(model, args, kwargs) or None)
        whole = fx.GraphModule(model, raw)
        ShapeInterpreter(whole, meta=True).run_graph(placeholder_values(whole, args, kwargs))
    except Exception as exc:
        return f"fails ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    return ""


def same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    """Whether two graphs have the same nodes in the same order: ops, targets and arguments
    (nodes matched by position, values by ``==``)."""
    na, nb = list(a.nodes), list(b.nodes)
    if len(na) != len(nb):
        return False
    match: dict[fx.Node, fx.Node] = {}
    for x, y in zip(na, nb):
        if x.op != y.op or not _same(x.target, y.target):
            return False
        args = fx.node.map_arg(x.args, lambda n: match.get(n, n))
        kwargs = fx.node.map_arg(x.kwargs, lambda n: match.get(n, n))
        if not (_same(args, y.args) and _same(kwargs, y.kwargs)):
            return False
        match[x] = y
    return True


def _random_like(example_inputs: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """The example inputs with every floating tensor replaced by a random one of its shape and
    scale (a branch on a value the example happens to avoid, such as a sign, shows there)."""
    gen = torch.Generator().manual_seed(0)

    def rnd(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            scale = float(v.detach().abs().max()) if v.numel() else 1.0
            r = torch.randn(v.shape, generator=gen, dtype=v.dtype)
            return (r * max(scale, 1e-3)).to(v.device)
        if isinstance(v, (list, tuple)):
            return type(v)(rnd(x) for x in v)
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        return v

    args, kwargs = example_inputs
    return rnd(args), rnd(kwargs)


def _outputs_differ(model: nn.Module, gm: fx.GraphModule, example_inputs: tuple[tuple, dict],
                    training: bool = False) -> str:
    """Compare in the mode the graph was traced in: eval, or training (its branches, e.g.
    auxiliary heads), with the same random numbers for both runs (dropout) and every buffer
    (running statistics) put back after each."""
    args, kwargs = example_inputs
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def call(fn: Any, *a: Any, **k: Any) -> Any:
        if not training:
            with eval_mode(model), eval_mode(gm):
                return fn(*a, **k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                return fn(*a, **k)
            finally:
                for b, saved in buffers:
                    b.data.copy_(saved)

    try:
        with torch.no_grad():
            want = call(gm, *placeholder_values(gm, args, kwargs))
            got = call(model, *args, **kwargs)
    except Exception as exc:  # the model's forward cannot run on the smaller modules
        return f"fails ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    a, b = flatten_outputs(got), flatten_outputs(want)
    if len(a) != len(b):
        return "returns another structure"
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return f"returns shape {tuple(x.shape)} where the pruned graph gives {tuple(y.shape)}"
        if x.is_floating_point() and x.numel():
            scale = max(1.0, float(y.abs().max()))
            if not float((x - y).abs().max()) <= 1e-5 * scale:
                return "computes different values"
        elif not torch.equal(x, y):
            return "computes different values"
    return ""
