"""Structured pruning of a GNN together with its graph: channels, heads, edges and nodes.

:func:`prune` removes a model's channels (as :func:`structprune.prune` does) and the graph's
edges and nodes in one call, and returns the smaller model with the smaller graph. Edges and
nodes are units like channels (:mod:`structprune.graph.units` says whether dropping them is
exact for the model and why not). What "exact" means for graph units (the oracle,
:func:`graph_oracle_diff`): a dropped edge is excluded from every aggregation (sums, mean
denominators, max, attention softmax, degree normalisation), because it is no longer in
``edge_index``; a dropped node takes its incident edges with it, and every kept node's output
equals the original model's on the graph without those edges, with the dropped channels zeroed.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ModelError, NothingPrunedWarning, PlanError
from ..graph.units import GraphUnits, graph_units
from ..oracle import flatten_outputs, masked_output
from ..plan import Plan, count_params

#: Scores for edges and nodes: names, or a tensor with one score per edge / node.
GRAPH_IMPORTANCES = ("taylor", "degree", "random")
Scores = Union[str, Tensor]


@dataclass
class GraphPruneResult:
    """What :func:`prune` returns; unpacks as ``pruned_model, pruned_data``.

    Attributes:
        model: the pruned model (fewer channels / heads where asked; a copy otherwise).
        data: a copy of the graph without the dropped edges and nodes: every attribute kept,
            per-node and per-edge ones sliced, ``edge_index`` re-indexed onto the kept nodes.
        edge_mask: bool over the original ``edge_index`` columns (True = kept; an edge of a
            dropped node is dropped).
        node_mask: bool over the original nodes (True = kept).
        plan: the channel plan (:class:`~structprune.Plan`; empty when only the graph was
            pruned); ``plan.activation_masks()`` as for CNNs.
        units: what the model allows (:class:`~structprune.graph.units.GraphUnits`).
    """

    model: nn.Module
    data: Any
    edge_mask: Tensor
    node_mask: Tensor
    plan: Plan
    units: GraphUnits

    def __iter__(self):
        yield self.model
        yield self.data

    @property
    def inputs(self) -> tuple:
        """The pruned model's positional inputs, taken from :attr:`data`."""
        return model_inputs(self.model, self.data)


def _to_data(model: nn.Module, data: Any) -> Any:
    from torch_geometric.data import Data

    if isinstance(data, Data):
        return data
    if isinstance(data, (tuple, list)):
        names = [p for p in inspect.signature(model.forward).parameters]
        if len(data) > len(names) or not {"x", "edge_index"} <= set(names[:len(data)]):
            raise ValueError(
                f"sp.gnn.prune: data given as inputs must follow {type(model).__name__}.forward's "
                f"argument names, which must include x and edge_index (got {names[:len(data)]}); "
                f"or pass a torch_geometric Data")
        return Data(**{n: v for n, v in zip(names, data) if v is not None})
    raise TypeError(f"sp.gnn.prune: data must be a torch_geometric Data or the model's inputs "
                    f"(a tuple), got {type(data).__name__}")


def model_inputs(model: nn.Module, data: Any) -> tuple:
    """``model``'s positional inputs from ``data``: its ``forward`` arguments by name, up to the
    first one ``data`` lacks (``x, edge_index[, edge_weight | edge_attr][, batch]``)."""
    params = inspect.signature(model.forward).parameters
    out = []
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            break
        value = getattr(data, name, None) if name in data else None
        if value is None:
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"sp.gnn.prune: {type(model).__name__}.forward needs {name!r}, "
                                 f"which data does not have (data has {', '.join(data.keys())})")
            break
        out.append(value)
    return tuple(out)


def _graph_dims(model: nn.Module, data: Any) -> tuple[dict[str, int], dict[str, int]]:
    """The model inputs that are per node / per edge, with their dim (PyG's ``__cat_dim__``)."""
    nodes, edges = {}, {}
    n_in = len(model_inputs(model, data))
    for name in list(inspect.signature(model.forward).parameters)[:n_in]:
        value = data[name]
        if not isinstance(value, Tensor):
            continue
        dim = data.__cat_dim__(name, value) if name != "edge_index" else 1
        if name == "edge_index" or data.is_edge_attr(name):
            edges[name] = dim
        elif data.is_node_attr(name):
            nodes[name] = dim
    if "edge_index" not in edges:
        raise ValueError(f"sp.gnn.prune: {type(model).__name__}.forward takes no edge_index")
    return nodes, edges


def _loss(out: Any, data: Any) -> Tensor:
    """Training loss when ``data`` has labels (``y``, ``train_mask``), else the output energy."""
    out = flatten_outputs(out)[0]
    y = getattr(data, "y", None)
    if isinstance(y, Tensor) and out.dim() == 2 and y.dim() == 1 and y.size(0) == out.size(0) \
            and not y.is_floating_point():
        mask = getattr(data, "train_mask", None)
        if isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.any():
            return F.cross_entropy(out[mask], y[mask])
        return F.cross_entropy(out, y)
    return 0.5 * out.float().square().sum()


def _taylor_edges(model: nn.Module, data: Any) -> Tensor:
    """``|∂L/∂m_e|`` at ``m = 1`` for a mask on every edge (first-order cost of dropping it):
    through ``edge_weight`` when the model takes it and passes it on, else PyG's explain hooks
    (PyG's ``GIN`` takes ``edge_weight`` but its convolutions ignore it)."""
    from . import masks as _masks

    ei = data.edge_index
    dtype = data.x.dtype if data.x.is_floating_point() else torch.float32
    names = list(inspect.signature(model.forward).parameters)
    args = list(model_inputs(model, data))
    routes = ["edge_weight"] if "edge_weight" in names else []
    routes += ["explain"] if _masks._message_passing_layers(model) else []
    if not routes:
        raise ModelError(f"sp.gnn.prune: {type(model).__name__} has no edge_weight argument and "
                         f"no torch_geometric MessagePassing layer, so graph_importance="
                         f"'taylor' cannot put a mask on its edges; use 'degree', 'random' "
                         f"or a tensor of scores")
    for route in routes:
        mask = torch.ones(ei.size(1), dtype=dtype, requires_grad=True)
        if route == "edge_weight":
            k = names.index("edge_weight")
            base = args[k] if k < len(args) else torch.ones(ei.size(1), dtype=dtype)
            out = model(*(args[:k] + [None] * (k - len(args)) + [base * mask] + args[k + 1:]))
        else:
            with _masks.explain_masks(model, mask, ei):
                out = model(*args)
        (grad,) = torch.autograd.grad(_loss(out, data), mask, allow_unused=True)
        if grad is not None and bool(grad.abs().sum() > 0):
            return grad.abs()
    raise ModelError(f"sp.gnn.prune: the edge mask does not reach {type(model).__name__}'s "
                     f"output ({' nor '.join(routes)}); score the edges another way "
                     f"(graph_importance='degree' or 'random', or a tensor of scores)")


def _taylor_nodes(model: nn.Module, data: Any) -> Tensor:
    """``|Σ_f x_vf ∂L/∂x_vf|`` per node: the first-order cost of zeroing its features."""
    x = data.x.detach().clone().requires_grad_(True)
    d = copy.copy(data)
    d.x = x
    (grad,) = torch.autograd.grad(_loss(model(*model_inputs(model, d)), data), x)
    return (x * grad).flatten(1).sum(1).abs().detach()


def _scores(kind: str, how: Scores, model: nn.Module, data: Any, n: int, seed: int) -> Tensor:
    if isinstance(how, Tensor):
        if how.numel() != n:
            raise ValueError(f"sp.gnn.prune: {kind} scores have {how.numel()} entries, the graph "
                             f"has {n} {kind}s")
        return how.detach().flatten().float()
    if how not in GRAPH_IMPORTANCES:
        raise ValueError(f"sp.gnn.prune: graph_importance must be one of {GRAPH_IMPORTANCES} or "
                         f"a tensor, got {how!r}")
    if how == "random":
        return torch.rand(n, generator=torch.Generator().manual_seed(seed))
    ei = data.edge_index
    deg = torch.bincount(ei.flatten(), minlength=data.num_nodes).float()
    if how == "degree":  # keep hubs and the edges of sparsely connected nodes
        if kind == "node":
            return deg
        return 1.0 / (deg[ei[0]] * deg[ei[1]]).clamp(min=1).sqrt()
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return _taylor_edges(model, data) if kind == "edge" else _taylor_nodes(model, data)
    finally:
        model.train(was)


def _keep_lowest_dropped(scores: Tensor, k: int, groups: Optional[Tensor] = None) -> Tensor:
    """A bool keep-mask dropping the ``k`` lowest-scored entries; with ``groups`` (a group id per
    entry) whole groups go, lowest summed score first, until at least ``k`` entries are gone."""
    n = scores.numel()
    keep = torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return keep
    if groups is None:
        keep[torch.sort(scores, stable=True).indices[:k]] = False
        return keep
    total = torch.zeros(int(groups.max()) + 1).index_add_(0, groups, scores)
    size = torch.bincount(groups, minlength=total.numel())
    dropped = 0
    for g in torch.sort(total, stable=True).indices.tolist():
        if dropped >= k:
            break
        keep[groups == g] = False
        dropped += int(size[g])
    return keep


def _undirected_groups(ei: Tensor, num_nodes: int) -> Tensor:
    """One id per unordered pair: (i, j) and (j, i) share it."""
    lo, hi = torch.minimum(ei[0], ei[1]), torch.maximum(ei[0], ei[1])
    return torch.unique(lo * num_nodes + hi, return_inverse=True)[1]


def prune(
    model: nn.Module,
    data: Any,
    ratio: Optional[Any] = None,
    *,
    edge_ratio: float = 0.0,
    node_ratio: float = 0.0,
    importance: Any = "l2",
    graph_importance: Scores = "taylor",
    node_importance: Optional[Scores] = None,
    undirected: bool = False,
    check: bool = True,
    tol: float = 1e-4,
    seed: int = 0,
    **kwargs: Any,
) -> GraphPruneResult:
    """Prune a GNN's channels and its graph's edges and nodes; ``model`` and ``data`` are not
    modified.

    Args:
        model: a GNN called with its inputs taken from ``data`` by ``forward``'s argument names
            (``model(x, edge_index)``, ``model(x, edge_index, edge_attr, batch)``).
        data: a PyG ``Data`` (or the model's positional inputs as a tuple).
        ratio: channels to remove, as :func:`structprune.prune` takes it (None: keep channels;
            ``head_ratio=``, ``target_macs=``, ``global_=``... pass through ``kwargs``).
        edge_ratio: fraction of the edges (``edge_index`` columns) to drop.
        node_ratio: fraction of the nodes to drop (with their incident edges and their rows of
            every per-node attribute: features, labels, masks, ``batch``).
        importance: the channel criterion (:class:`structprune.Pruner`'s).
        graph_importance: how edges (and nodes, unless ``node_importance``) are scored:
            ``"taylor"`` (``|∂L/∂m|`` of a mask at 1, with ``L`` the cross entropy on
            ``train_mask`` when ``data`` has ``y``, else the output's energy), ``"degree"``
            (edges: ``1/sqrt(deg_i deg_j)``, nodes: degree) or ``"random"``; or a tensor of
            scores (one per edge: a UGS edge mask, an explainer's). Lowest go first.
        undirected: drop (i, j) and (j, i) together (scores summed per pair).
        check: verify the graph-unit oracle (:func:`graph_oracle_diff`) and refuse otherwise.
        seed: for ``"random"`` scores.

    Returns:
        a :class:`GraphPruneResult` (unpacks as ``pruned_model, pruned_data``).

    Raises:
        ValueError: a ratio outside ``[0, 1)``, scores of the wrong length, data that lacks an
            input the model needs.
        PlanError: dropping nodes (or edges) is not exact for this model (the message names the
            op), or the pruned model disagrees with the oracle.
    """
    from ..graph.depgraph import trace
    from ..pruner import Pruner, warn_if_little_pruned

    for name, r in (("edge_ratio", edge_ratio), ("node_ratio", node_ratio)):
        if not 0.0 <= float(r) < 1.0:
            raise ValueError(f"sp.gnn.prune: {name} must lie in [0, 1) (the fraction dropped), "
                             f"got {r}")
    data = _to_data(model, data)
    args = model_inputs(model, data)
    nodes, edges = _graph_dims(model, data)
    channels = ratio is not None or any(k in kwargs for k in ("head_ratio", "target_macs"))
    if channels:
        pruner = Pruner(model, args, ratio=ratio, importance=importance, **kwargs)
        graph = pruner.graph
        plan = pruner.plan()
    else:
        if kwargs:
            raise TypeError(f"sp.gnn.prune: {', '.join(kwargs)} only apply with ratio= / "
                            f"head_ratio= / target_macs= (channel pruning)")
        graph = trace(model, args)
        plan = Plan(graph)
    units = graph_units(graph, {k: v for k, v in nodes.items()}, edges)
    who = type(model).__name__
    if node_ratio > 0 and units.node_reason:
        raise PlanError(f"sp.gnn.prune: dropping nodes of {who} would not be exact: "
                        f"{units.node_reason}. Prune edges or channels only (node_ratio=0)")
    if edge_ratio > 0 and units.edge_reason:
        raise PlanError(f"sp.gnn.prune: dropping edges of {who} would not be exact: "
                        f"{units.edge_reason}. Prune channels only (edge_ratio=0)")
    params = (units.node_params if node_ratio > 0 else []) + (
        units.edge_params if edge_ratio > 0 else [])
    if params:
        raise PlanError(f"sp.gnn.prune: {who} has parameters with one row per graph node or edge "
                        f"({', '.join(str(p) for p in params[:3])}); slicing them with the graph "
                        f"is not supported yet: prune channels only")

    ei, n, e = data.edge_index, data.num_nodes, data.edge_index.size(1)
    node_mask = torch.ones(n, dtype=torch.bool)
    if node_ratio > 0:
        k = int(round(node_ratio * n))
        how = node_importance if node_importance is not None else graph_importance
        node_mask = _keep_lowest_dropped(_scores("node", how, model, data, n, seed), k)
    edge_mask = torch.ones(e, dtype=torch.bool)
    if edge_ratio > 0:
        k = int(round(edge_ratio * e))
        groups = _undirected_groups(ei, n) if undirected else None
        edge_mask = _keep_lowest_dropped(_scores("edge", graph_importance, model, data, e, seed),
                                         k, groups)
    if (edge_ratio > 0 and edge_mask.all()) or (node_ratio > 0 and node_mask.all()):
        warnings.warn(f"sp.gnn.prune: edge_ratio={edge_ratio} / node_ratio={node_ratio} removed "
                      f"nothing from a graph of {e} edges and {n} nodes", NothingPrunedWarning,
                      stacklevel=2)
    edge_mask &= node_mask[ei[0]] & node_mask[ei[1]]
    pruned_data = data.edge_subgraph(edge_mask)
    if not node_mask.all():
        pruned_data = pruned_data.subgraph(node_mask)
    if channels:
        pruned = pruner.apply(plan)
        warn_if_little_pruned(pruner, count_params(model), count_params(pruned))
    else:
        pruned = copy.deepcopy(model)
    result = GraphPruneResult(pruned, pruned_data, edge_mask, node_mask, plan, units)
    if check:
        diff = graph_oracle_diff(model, data, result)
        if not diff <= tol:
            raise PlanError(f"sp.gnn.prune: the pruned {who} on the pruned graph differs from "
                            f"the original with the dropped edges excluded and the dropped "
                            f"channels zeroed by {diff:.2e} (relative); not returned")
    return result


def graph_oracle_diff(model: nn.Module, data: Any, result: GraphPruneResult) -> float:
    """The graph-unit oracle: the largest relative difference between ``result.model`` on
    ``result.data`` and the original ``model`` with the dropped channels zeroed
    (``result.plan``) on

    - ``data`` without the dropped edges and without every edge of a dropped node, over the
      kept nodes' rows, for per-node outputs (a kept node sees the dropped ones through edges
      only);
    - the pruned graph, for other outputs (one row per graph: a dropped node is excluded from
      its graph's pooling as from every aggregation).

    ``inf`` where the outputs cannot be matched row for row."""
    data = _to_data(model, data)
    n, mask = data.num_nodes, result.node_mask
    flags = [(m, m.training) for m in (model, result.model)]

    def original(graph: Any) -> list[Tensor]:
        args = model_inputs(model, graph)
        out = model(*args) if result.plan.is_empty else masked_output(result.plan.graph,
                                                                     result.plan, args)
        return flatten_outputs(out)

    try:
        model.eval()
        result.model.eval()
        with torch.no_grad():
            got = flatten_outputs(result.model(*result.inputs))
            full = original(data.edge_subgraph(result.edge_mask))
            sub = original(result.data) if not mask.all() else full
    finally:
        for m, flag in flags:
            m.train(flag)
    if not len(full) == len(sub) == len(got):
        return float("inf")
    worst = 0.0
    for w_full, w_sub, g in zip(full, sub, got):
        per_node = w_full.dim() > 0 and w_full.size(0) == n and g.size(0) == int(mask.sum())
        w = w_full[mask] if per_node else w_sub
        if w.shape != g.shape:
            return float("inf")
        if w.numel():
            diff = float((w - g).abs().max())
            worst = max(worst, diff / max(float(w.abs().max()), 1e-12))
    return worst
