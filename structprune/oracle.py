"""The correctness oracle of DESIGN.md: run a traced graph with the dropped units' activations
zeroed, and compare outputs. The pruner measures approximate rules with it, ``export`` compares
outputs with it, and :mod:`structprune.testing` builds its checks on it."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .graph.depgraph import DependencyGraph
from .graph.capture import normalize_inputs
from .graph.shapes import _load_args, placeholder_values
from .plan import Plan


class MaskedInterpreter(fx.Interpreter):
    """Run a traced graph with the given activation indices set to zero.

    ``masks`` is ``{node name: [(dim, indices), ...]}`` (or ``(dim, indices)`` per node).
    """

    def __init__(self, gm: fx.GraphModule, masks: dict[str, Any]) -> None:
        super().__init__(gm)
        self.masks = {k: (v if isinstance(v, list) else [v]) for k, v in masks.items()}

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple:
        # plain lists and dicts, as the generated code passes them: a function may mutate a
        # list argument (torchvision's 3-D Swin edits its window size), fx's own are immutable
        return _load_args(n.args, self.env), _load_args(n.kwargs, self.env)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.masks and isinstance(out, torch.Tensor):
            for dim, idx in self.masks[n.name]:
                idx = torch.as_tensor(idx, dtype=torch.long)
                if idx.numel():
                    out = out.clone().index_fill_(dim % out.dim(), idx, 0.0)
        return out


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for k in sorted(out) for v in flatten_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [v for o in out for v in flatten_outputs(o)]
    return []


def max_rel_diff(a: Any, b: Any) -> float:
    """Largest ``|a - b| / max(1, |b|_max)`` over matching output tensors (inf if shapes differ)."""
    fa, fb = flatten_outputs(a), flatten_outputs(b)
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb)):
        return float("inf")
    worst = 0.0
    for x, y in zip(fa, fb):
        if x.numel():
            d = (x.double() - y.double()).abs().max().item()
            worst = max(worst, d / max(1.0, y.double().abs().max().item()))
    return worst


def run(model: nn.Module, example_inputs: Any) -> Any:
    args, kwargs = normalize_inputs(example_inputs)
    with torch.no_grad():
        return model(*args, **kwargs)


def masked_output(graph: DependencyGraph, plan: Plan, example_inputs: Any = None) -> Any:
    """The original graph's output with every dropped activation zeroed (all dims), on the
    traced example inputs or on ``example_inputs`` of other sizes where the graph computes them
    (a graph captured with open sizes: a GNN on another graph, another batch)."""
    gm = graph.graph_module
    interp = MaskedInterpreter(gm, plan.activation_masks_all())
    args, kwargs = (graph.args, graph.kwargs) if example_inputs is None else \
        normalize_inputs(example_inputs)
    with torch.no_grad():
        return interp.run(*placeholder_values(gm, args, kwargs))
