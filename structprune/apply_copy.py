"""A pruned copy of the model: of its own class where its ``forward`` runs unchanged on the
smaller modules, else the rewritten graph (:class:`Applied` says which, and why)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.nn as nn

from .apply import _calls, _same, _update_and_check, apply_plan
from .errors import StructpruneWarning
from .graph.inputs import add_guard_hook
from .graph.modules import plain_module
from .own_export import own_class_after_export
from .own_forward import own_forward_differs
from .plan import Plan
from .scratch import scratch_space
from .slicing import copy_sliced_roots, sliced_tensors


@dataclass(frozen=True)
class Applied:
    """What :func:`apply_plan_copy` returned: the pruned model, and why it has that type."""

    model: nn.Module
    own_class: bool  # an object of the model's own class (its forward runs), else a GraphModule
    reason: str


def apply_plan_copy(plan: Plan, example_inputs: tuple[tuple, dict]) -> Applied:
    """A pruned copy of the traced model, of the model's own class when its ``forward`` runs
    unchanged on the smaller modules, else an ``fx.GraphModule`` with the rewritten graph.

    The model and its traced module are copied together (they share their submodules and
    tensors, and so do the copies), with the sliced tensors in place of the old ones; the rules
    update the copied modules during the checking run. The copy of the model is returned when
    no literal in the graph had to change, fx lifted no tensor constant that loses indices,
    and the copy's own forward gives the pruned graph's output on the example inputs; otherwise
    the copied graph is returned, and ``reason`` says why.
    """
    applied = _apply_plan_copy(plan, example_inputs)
    if not applied.own_class:
        applied.model.meta["structprune_returned"] = applied.reason
    return applied


def _apply_plan_copy(plan: Plan, example_inputs: tuple[tuple, dict]) -> Applied:
    graph = plan.graph
    gm, model = graph.graph_module, graph.model
    if gm.meta.get("structprune_capture") == "export":
        pruned = apply_plan(plan, example_inputs)
        own, reason = own_class_after_export(model, pruned, example_inputs)
        if own is not None:
            return Applied(own, True, reason)
        dropped = gm.meta.get("structprune_dropped_outputs") or []
        if dropped:
            warnings.warn(f"the pruned graph returns None where {type(model).__name__} returns "
                          f"a {', '.join(dropped)} (a graph cannot hold it): {reason}",
                          StructpruneWarning, stacklevel=4)
        return Applied(pruned, False, f"captured by torch.export: {reason}")
    with scratch_space():
        dropped = plan.dropped_indices()
        sliced = sliced_tensors(gm, dropped)
        model_c, gm_c = copy_sliced_roots([model, gm], sliced)
        before = _calls(gm_c.graph)
        _update_and_check(gm_c, plan, dropped, example_inputs)
        changed = [n for n, t, a, k in before if not (
            _same(t, n.target) and _same(a, n.args) and _same(k, n.kwargs))]
        if len(before) != len(gm_c.graph.nodes) or changed:
            gm_c.graph.lint()
            where = changed[0].format_node() if changed else "(nodes added or removed)"
            return Applied(plain_module(gm_c), False,
                           f"a literal size in forward had to change ({where}), so the "
                           f"rewritten graph is returned")
        constants = [q for q in sliced if q.rpartition(".")[2].startswith("_tensor_constant")]
        if constants:
            return Applied(plain_module(gm_c), False,
                           f"forward reads a tensor that is not a parameter, buffer or module "
                           f"attribute (fx lifted it as '{constants[0]}'), so the rewritten "
                           f"graph is returned")
        problem = own_forward_differs(model_c, gm_c, graph, example_inputs)
        if problem:
            return Applied(plain_module(gm_c), False,
                           f"the model's own forward {problem} on the pruned modules, so the "
                           f"rewritten graph is returned")
        add_guard_hook(model_c, gm.meta.get("structprune_specialised", {}))
        return Applied(model_c, True, f"{type(model).__name__}'s own forward runs on the pruned "
                                      f"modules, so an object of that class is returned")
