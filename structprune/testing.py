"""Oracle checks of DESIGN.md, public so that users can test their own rules and models.

``assert_rule`` runs, in order: zero-ratio identity, the masked-activation oracle (the pruned
model equals the original with the dropped units' activations zeroed), structure (lint, exact
parameter counts), ONNX parity (when the ``[onnx]`` extra is installed) and save/load.
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .rules import Space
from .graph.depgraph import DependencyGraph, trace
from .oracle import (MaskedInterpreter as MaskedInterpreter, flatten_outputs as flatten_outputs,
                     masked_output as masked_output, max_rel_diff as max_rel_diff, run as run)
from .plan import Plan
from .pruner import Pruner


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norm layers random affine parameters and running statistics (in place).

    Freshly built models have BatchNorm at identity, which would hide a wrongly sliced norm.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias", "running_mean"):
                t = getattr(m, name, None)
                if isinstance(m, nn.modules.batchnorm._NormBase) or isinstance(
                        m, (nn.GroupNorm, nn.LayerNorm)):
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5
                                + (1.0 if name == "weight" else 0.0))
            rv = getattr(m, "running_var", None)
            if isinstance(rv, torch.Tensor) and rv.is_floating_point():
                rv.copy_(torch.rand(rv.shape, generator=g, dtype=rv.dtype) + 0.5)
    return model


def assert_zero_ratio_identity(model: nn.Module, example_inputs: Any, **kwargs: Any) -> None:
    """``prune(ratio=0)`` must give bit-identical outputs and identical parameter shapes."""
    from .pruner import prune

    pruned = prune(model, example_inputs, ratio=0.0, **kwargs)
    a, b = flatten_outputs(run(pruned, example_inputs)), flatten_outputs(run(model, example_inputs))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), \
        "zero-ratio pruning changed the outputs"
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    assert shapes(pruned) == shapes(model), "zero-ratio pruning changed parameter shapes"


def assert_oracle(pruner: Pruner, plan: Optional[Plan] = None, tol: float = 1e-5) -> nn.Module:
    """Apply ``plan`` (default: ``pruner.plan()``) and compare with the masked original."""
    plan = plan if plan is not None else pruner.plan()
    graph = plan.graph
    graph.lint()
    pruned = pruner.apply(plan)
    got = run(pruned, pruner.example_inputs)
    want = masked_output(graph, plan)
    d = max_rel_diff(got, want)
    assert d <= tol, f"oracle: pruned output differs from the masked original by {d:.3e} ({plan})"
    # Exactly the members' parameter slices are gone, and every other parameter keeps its shape.
    dropped = plan.dropped_indices()
    got_params = dict(pruned.named_parameters(remove_duplicate=False))
    for name, t in graph.graph_module.named_parameters():
        want_shape = tuple(n - len(dropped.get(Space.param(name, d), ())) for d, n in
                           enumerate(t.shape))
        got_t = got_params.get(name)
        assert got_t is not None and tuple(got_t.shape) == want_shape, \
            f"parameter {name}: shape {None if got_t is None else tuple(got_t.shape)}, " \
            f"the plan implies {want_shape}"
    return pruned


def plan_dropping(graph: DependencyGraph, drop: dict[str, Sequence[int]]) -> Plan:
    """A plan that removes the units holding the given output indices of named modules/nodes.

    ``drop={"0": [2, 3]}`` drops the units containing output channels 2 and 3 of module ``0``
    (or of the fx node named ``0``).
    """
    names = {}
    for n in graph.graph_module.graph.nodes:
        names.setdefault(str(n.target) if n.op == "call_module" else n.name, n.name)
        names.setdefault(n.name, n.name)
    drops: dict[int, set[int]] = {}
    for key, idx in drop.items():
        node = names.get(key)
        if node is None:
            raise KeyError(f"no module or node named {key!r}")
        wanted = set(int(i) for i in idx)
        found = False
        for g in graph.groups():
            for m in g.activations:
                if not m.space.is_node_tensor or m.space.node != node:
                    continue
                sel = np.isin(m.index.numpy(), list(wanted))
                if sel.any():
                    drops.setdefault(g.id, set()).update(m.unit.numpy()[sel].tolist())
                    found = True
        if not found:
            raise ValueError(f"indices {sorted(wanted)} of {key!r} are in no prunable group "
                             f"(frozen: {graph.frozen()[:3]})")
    return Plan(graph, {g: torch.tensor(sorted(u)) for g, u in drops.items()})


def assert_rule(model: nn.Module, example_inputs: Any, drop: Optional[dict] = None,
                ratio: float = 0.5, importance: Any = "l2", tol: float = 1e-5,
                onnx: bool = True, save_load: bool = True, **kwargs: Any) -> nn.Module:
    """All the checks of STYLE.md §4 on one model; returns the pruned model.

    Prunes the units named by ``drop`` (see :func:`plan_dropping`) or, without it, ``ratio`` of
    every group by ``importance``. Run in float64 for tight tolerances.
    """
    before = copy.deepcopy(model.state_dict())
    assert_zero_ratio_identity(model, example_inputs, **kwargs)
    pruner = Pruner(model, example_inputs, ratio=ratio, importance=importance, **kwargs)
    plan = plan_dropping(pruner.graph, drop) if drop is not None else pruner.plan()
    assert not plan.is_empty, f"nothing to prune; frozen: {pruner.graph.frozen()}"
    pruned = assert_oracle(pruner, plan, tol)
    trace(pruned, example_inputs).lint()
    if onnx:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            pass
        else:
            from .export.onnx import export_onnx

            with tempfile.TemporaryDirectory() as d:
                export_onnx(pruned, example_inputs, os.path.join(d, "m.onnx"), check=True)
    if save_load:
        from .io import load, save

        with tempfile.TemporaryDirectory() as d:
            save(pruned, os.path.join(d, "m.sp"), example_inputs=example_inputs)
            again = load(os.path.join(d, "m.sp"))
            sd0, sd1 = pruned.state_dict(), again.state_dict()
            # A model of the user's class is saved as its graph, which may hold tensor
            # constants fx lifted from forward as extra entries.
            assert sd0.keys() <= sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0), \
                "save/load changed the state dict"
            # Outputs agree to rounding (kernels may pick another summation order on new memory).
            dd = max_rel_diff(run(again, example_inputs), run(pruned, example_inputs))
            assert dd <= 1e-12, f"save/load changed the outputs by {dd:.3e}"
    after = model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in after.items()), "the input model changed"
    return pruned


def assert_graph_oracle(model: nn.Module, data: Any, result: Any, tol: float = 1e-5) -> None:
    """The graph-unit oracle for :func:`structprune.gnn.prune`'s ``result``: the pruned model on
    the pruned graph equals ``model`` on ``data`` with the dropped edges (and every edge of a
    dropped node) excluded from every aggregation and the dropped channels zeroed, on the kept
    nodes' rows (see :func:`structprune.gnn.graph_oracle_diff`)."""
    from .gnn.prune import graph_oracle_diff

    d = graph_oracle_diff(model, data, result)
    assert d <= tol, (f"graph oracle: the pruned model on the pruned graph differs from the "
                      f"original with the dropped edges and channels excluded by {d:.3e}")
