"""Physical pruning: one slicing pass over parameters and buffers, then module attributes and
literal shape arguments, checked node by node against the shapes the plan implies.

The pass runs the graph once on the example inputs. Before each node runs, its rule's ``update``
adjusts module attributes (``in_channels``) or rewrites literal arguments that no longer match
(``view(B, 8, 3, 16)`` after a head is removed); after it runs, its output shape must equal the
shape the plan implies, or the pass raises. A wrong model is never returned silently.

:func:`apply_plan` returns the sliced graph; ``apply_copy.py`` returns a copy of the model's own
class where it can, and ``apply_in_place.py`` slices the model itself.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .errors import UnsupportedOpError
from .graph.modules import plain_module
from .graph.shapes import ShapeInterpreter, placeholder_values, shape_record
from .plan import Plan
from .rules import ApplyContext, OpRule, Space, map_record
from .scratch import scratch_space
from .slicing import copy_sliced


class _Applier(ShapeInterpreter):
    def __init__(self, gm: fx.GraphModule, rules: dict[str, OpRule], shapes: dict[str, Any],
                 dropped: dict[Space, np.ndarray], meta: bool) -> None:
        super().__init__(gm, meta)
        self.node_rules, self.shapes, self.dropped_idx = rules, shapes, dropped
        self.modules = dict(gm.named_modules())

    def run_node(self, n: fx.Node) -> Any:
        rule = self.node_rules.get(n.name)
        module = self.modules.get(str(n.target)) if n.op == "call_module" else None
        actx = ApplyContext(n, module, self.env, self.shapes, self.dropped_idx)
        if rule is not None:
            try:
                rule.update(actx)
            except NotImplementedError as exc:
                raise UnsupportedOpError(f"cannot apply the plan at {n.format_node()}: {exc}. "
                                         f"Freeze this op (ignore=/leaf_modules=).") from exc
        out = super().run_node(n)
        self._check(n, out, actx)
        return out

    def _check(self, n: fx.Node, out: Any, actx: ApplyContext) -> None:
        if isinstance(out, torch.Tensor):
            want = actx.new_shape(n)
            got: Any = tuple(out.shape)
        elif isinstance(out, (tuple, list, dict)):  # every tensor inside, at any depth
            want = actx.new_record(n)
            got = map_record(shape_record(out), lambda path, shape: tuple(shape))
        else:
            return
        if want is not None and got != want:
            raise UnsupportedOpError(
                f"after slicing, node {n.format_node()} produced shape {got} where the plan "
                f"implies {want}. Its rule cannot express this plan; freeze the op (ignore=, "
                f"leaf_modules=) or register a rule for it. Nothing was returned.")


def apply_plan(plan: Plan, example_inputs: tuple[tuple, dict]) -> fx.GraphModule:
    """A new, sliced copy of ``plan.graph.graph_module``; the traced model is not touched."""
    with scratch_space():
        return _apply_plan(plan, example_inputs)


def _apply_plan(plan: Plan, example_inputs: tuple[tuple, dict]) -> fx.GraphModule:
    graph = plan.graph
    dropped = plan.dropped_indices()
    target = copy_sliced(graph.graph_module, dropped)
    before = _calls(target.graph)
    _update_and_check(target, plan, dropped, example_inputs)
    # Rules replace a node's args/kwargs/target to change them; when none did, the graph is a
    # copy of a valid one.
    if len(before) != len(target.graph.nodes) or _calls_changed(before):
        target.graph.lint()
    return plain_module(target)


def _update_and_check(gm: fx.GraphModule, plan: Plan, dropped: dict[Space, np.ndarray],
                      example_inputs: tuple[tuple, dict]) -> None:
    """Run ``gm`` once, updating attributes and literals before each node and checking its new
    shape after it: on the meta device, or for real where a meta kernel is missing (updates are
    idempotent, so a failed meta run can be redone)."""
    graph = plan.graph
    inputs = placeholder_values(gm, *example_inputs)
    try:
        _Applier(gm, graph.node_rules, graph.shapes, dropped, meta=True).run_graph(inputs)
    except UnsupportedOpError:
        raise
    except Exception:
        _Applier(gm, graph.node_rules, graph.shapes, dropped, meta=False).run_graph(inputs)


def _calls(graph: fx.Graph) -> list[tuple[fx.Node, Any, Any, Any]]:
    return [(n, n.target, n.args, n.kwargs) for n in graph.nodes]


def _same(a: Any, b: Any) -> bool:
    """Equal node arguments: nodes by identity, containers item by item, values by ``==``."""
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, fx.Node):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, slice):
        return _same(a.start, b.start) and _same(a.stop, b.stop) and _same(a.step, b.step)
    try:
        eq = a == b
    except Exception:
        return False
    return eq if isinstance(eq, bool) else False


def _calls_changed(before: list[tuple[fx.Node, Any, Any, Any]]) -> bool:
    """Whether any node's target, args or kwargs differ from ``(node, target, args, kwargs)``
    recorded before (rules rewrite literal sizes by replacing a node's args)."""
    return any(not (_same(t, n.target) and _same(a, n.args) and _same(k, n.kwargs))
               for n, t, a, k in before)
