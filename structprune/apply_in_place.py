"""Pruning in place (``sp.prune_``): the model's own tensors get the sliced data, its optimizer's
state is sliced with them, and any failure restores everything (:class:`Snapshot`)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .apply import _calls, _calls_changed, _update_and_check
from .errors import PlanError
from .graph.inputs import add_guard_hook
from .own_forward import own_forward_differs
from .plan import Plan
from .scratch import scratch_space
from .slicing import _by_tensor, slice_like, sliced_tensors


def literal_sizes_error(model: nn.Module) -> PlanError:
    return PlanError(f"{type(model).__name__} cannot be pruned in place: its forward has literal "
                     f"sizes that must change. Use sp.prune(...), which returns a model with the "
                     f"rewritten graph.")


class Snapshot:
    """What in-place slicing may change, saved so that a failure leaves everything as it was:
    every module's attributes, parameters and buffers, every tensor's data, every node's call,
    and the optimizer state of the parameters."""

    def __init__(self, roots: list[nn.Module], graph: Optional[fx.Graph] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        seen: dict[int, nn.Module] = {}
        for root in roots:
            for m in root.modules():
                seen.setdefault(id(m), m)
        self.modules = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers))
                        for m in seen.values()]
        self.hooks = [(table, dict(table)) for m in seen.values()
                      for table in (m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs)]
        tensors = {id(t): t for _, _, ps, bs in self.modules
                   for t in list(ps.values()) + list(bs.values()) if t is not None}
        self.data = [(t, t.data, t.grad) for t in tensors.values()]
        self.nodes = _calls(graph) if graph is not None else []
        self.optimizer = optimizer
        self.opt_state = ({p: dict(st) for p, st in optimizer.state.items()}
                          if optimizer is not None else {})

    def calls_changed(self) -> bool:
        return _calls_changed(self.nodes)

    def restore(self) -> None:
        for m, attrs, params, buffers in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        for table, saved in self.hooks:
            table.clear()
            table.update(saved)
        for t, data, grad in self.data:
            if t.data is not data:
                t.data = data
            t.grad = grad
        for n, t, a, k in self.nodes:
            if n.target is not t:
                n.target = t
            if n.args is not a:
                n.args = a
            if n.kwargs is not k:
                n.kwargs = k
        if self.optimizer is not None:
            for p, st in self.opt_state.items():
                self.optimizer.state[p] = st


def slice_optimizer_state(optimizer: torch.optim.Optimizer, old_shapes: dict[int, tuple],
                          dims_of: dict[int, list[tuple[int, np.ndarray]]]) -> None:
    """Slice the per-parameter state of ``optimizer`` (Adam moments, momentum buffers, ...)
    like the parameters it belongs to: every state tensor with the parameter's old shape loses
    the same indices; scalars (``step``) stay. ``old_shapes`` and ``dims_of`` are keyed by
    ``id(parameter)``."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in dims_of or p not in optimizer.state:
                continue
            st = optimizer.state[p]
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and tuple(v.shape) == old_shapes[id(p)]:
                    st[k] = slice_like(v, dims_of[id(p)]).clone()
                elif isinstance(v, torch.Tensor) and v.dim() > 0:
                    raise PlanError(
                        f"cannot slice optimizer state '{k}' of a pruned parameter: its shape "
                        f"{tuple(v.shape)} is not the parameter's {old_shapes[id(p)]}. Rebuild "
                        f"the optimizer after pruning.")


def held_parameters(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def apply_plan_(plan: Plan, example_inputs: tuple[tuple, dict],
                optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Apply ``plan`` to the traced model itself: its modules get new attributes and every
    parameter and buffer that loses indices keeps its identity and gets the sliced data
    (``t.data = ...``), so tied weights stay tied and an optimizer built before pruning still
    holds the model's parameters. Their ``.grad`` is dropped (it has the old shape), and
    ``optimizer``'s per-parameter state is sliced along with them.

    Raises :class:`PlanError` when the model's own forward would need new literal sizes
    (``x.view(B, 64, -1)``) or when the graph was captured by ``torch.export`` (its modules are
    not the model's); any error leaves the model and the optimizer exactly as they were.
    """
    graph = plan.graph
    gm, model = graph.graph_module, graph.model
    if gm.meta.get("structprune_capture") == "export":
        raise PlanError(f"{type(model).__name__} was captured by torch.export, whose graph does "
                        f"not run the model's own modules; prune it with sp.prune(...)")
    with scratch_space():
        dropped = plan.dropped_indices()
        snap = Snapshot([model, gm], gm.graph, optimizer)
        try:
            sliced = sliced_tensors(gm, dropped)
            dims = _by_tensor(dropped)
            old_shapes: dict[int, tuple] = {}
            dims_of: dict[int, list[tuple[int, np.ndarray]]] = {}
            for qual, (old, new) in sliced.items():
                if qual.rpartition(".")[2].startswith("_tensor_constant"):
                    raise PlanError(
                        f"{type(model).__name__} cannot be pruned in place: it reads a tensor "
                        f"that is not a parameter, buffer or attribute of a module (fx lifted it "
                        f"as '{qual}'), which would keep its old size. Register it as a buffer, "
                        f"or use sp.prune(...).")
                if id(old) in old_shapes:  # a tied tensor under a second name
                    continue
                old_shapes[id(old)], dims_of[id(old)] = tuple(old.shape), dims[qual]
                old.data = new.detach()
                old.grad = None
            if optimizer is not None:
                slice_optimizer_state(optimizer, old_shapes, dims_of)
            _update_and_check(gm, plan, dropped, example_inputs)
            if snap.calls_changed():
                raise literal_sizes_error(model)
            problem = own_forward_differs(model, gm, graph, example_inputs)
            if problem:
                raise PlanError(f"{type(model).__name__} cannot be pruned in place: on the "
                                f"pruned modules its own forward {problem}. Use sp.prune(...), "
                                f"which returns the rewritten graph.")
            add_guard_hook(model, gm.meta.get("structprune_specialised", {}))
        except BaseException:
            snap.restore()
            raise
