"""Shared helpers for op-rule tests: build the hand-made reference from sliced tensors."""
import torch


def copy_sliced(ref, src, keep=None):
    """Copy ``src``'s state into ``ref``; ``keep={name: (dim, idx)}`` slices those tensors first.

    Several slices of one tensor are given as a list of (dim, idx).
    """
    keep = keep or {}
    sd = src.state_dict()
    out = {}
    for k, v in sd.items():
        spec = keep.get(k, [])
        for dim, idx in ([spec] if isinstance(spec, tuple) else spec):
            v = v.index_select(dim, torch.as_tensor(idx))
        out[k] = v
    ref.load_state_dict(out)
    return ref


def random_drops(graph, seed=0):
    """``{group id: sorted unit indices}``: a random non-empty, non-total subset of the units of
    every group with at least two units (what the fuzz and shape-query tests prune)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    drops = {}
    for g in graph.groups():
        if g.num_units >= 2:
            k = int(rng.integers(1, g.num_units))
            drops[g.id] = torch.as_tensor(np.sort(rng.choice(g.num_units, k, replace=False)))
    return drops


def reader(graph, module):
    """The node that calls ``module`` (fx) or reads its weight (an ATen call, under export)."""
    for n in graph.graph_module.graph.nodes:
        if n.op == "call_module" and n.target == module:
            return n.name
        if n.op == "call_function" and any(getattr(a, "target", None) == f"{module}.weight"
                                           for a in n.args):
            return n.name
    raise KeyError(module)
