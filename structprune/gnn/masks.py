"""Soft edge masks and weight masks for graph lottery tickets, on sparse edge lists.

Two ways to put one trainable scalar on every directed edge of ``data.edge_index`` (no N x N
matrix anywhere):

- ``"edge_weight"``: the mask is passed as the model's ``edge_weight`` argument, so the model's
  own normalisation sees the masked adjacency. This is the faithful route for UGS's GCN
  (``models/gnn_ugs.py``: ``D (A ⊙ m + I)^T D`` with the degree taken over each edge's source,
  self-loops of weight 1 appended *after* masking, so they are never masked) and for PyG's
  ``GCNConv`` / ``GraphConv``. PyG's ``gcn_norm`` differs from the official code in two places:
  it takes the degree over each edge's *target* (the official row sums are over the *source*; the
  two agree only for a symmetric mask), and ``add_remaining_self_loops`` keeps a self-loop already
  in the graph with its masked weight instead of adding a second, unmasked one.
- ``"explain"``: PyG's explain hooks (``set_masks(..., apply_sigmoid=False)``) multiply the
  messages of every ``MessagePassing`` layer by the mask. The self-loops a layer adds itself get
  weight 1 (``MessagePassing.explain_message``). This works for layers without ``edge_weight``
  (GAT, GIN, SAGE), but it masks messages *after* the layer's normalisation: a GCNConv's degrees,
  a mean's denominator and an attention softmax still count a masked edge (as the official GIN
  does for its mean; the official GAT masks the attention *logit* instead, see ALGORITHMS.md §2.5).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import ModelError

ROUTES = ("auto", "edge_weight", "explain")


def _message_passing_layers(model: nn.Module) -> list[nn.Module]:
    from torch_geometric.nn.conv import MessagePassing

    return [m for m in model.modules() if isinstance(m, MessagePassing)]


def takes_edge_weight(model: nn.Module) -> bool:
    """Whether ``model.forward`` has an ``edge_weight`` parameter (or ``**kwargs``)."""
    params = inspect.signature(model.forward).parameters
    return "edge_weight" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def resolve_route(model: nn.Module, route: str) -> str:
    """The edge-mask route for ``model``: ``"auto"`` takes ``"edge_weight"`` when
    ``model.forward`` accepts ``edge_weight``, else ``"explain"``."""
    name = type(model).__name__
    if route not in ROUTES:
        raise ValueError(f"find_ticket: edge_route must be one of {ROUTES}, got {route!r}")
    if route == "auto":
        route = "edge_weight" if takes_edge_weight(model) else "explain"
    if route == "edge_weight" and not takes_edge_weight(model):
        raise ModelError(
            f"find_ticket(edge_route='edge_weight'): {name}.forward takes no edge_weight argument, "
            f"so the edge mask cannot reach it; add an edge_weight argument that scales each edge's "
            f"message (and pass it to the convolutions), or use edge_route='explain' to mask the "
            f"messages of every MessagePassing layer"
        )
    if route == "explain" and not _message_passing_layers(model):
        raise ModelError(
            f"find_ticket(edge_route='explain'): {name} has no torch_geometric MessagePassing layer "
            f"whose messages the edge mask could multiply; give the model an edge_weight argument "
            f"(edge_route='edge_weight') or build it from PyG convolutions"
        )
    return route


@contextlib.contextmanager
def explain_masks(model: nn.Module, mask: Tensor, edge_index: Tensor) -> Iterator[None]:
    """Multiply every MessagePassing layer's messages by ``mask`` (one value per column of
    ``edge_index``) inside the ``with`` block; the layers' own self-loops get weight 1."""
    from torch_geometric.explain.algorithm.utils import clear_masks, set_masks

    set_masks(model, mask, edge_index, apply_sigmoid=False)
    try:
        yield
    finally:
        clear_masks(model)


def forward(
    model: nn.Module,
    x: Tensor,
    edge_index: Tensor,
    route: str,
    edge_mask: Tensor | None = None,
    params: dict[str, Tensor] | None = None,
) -> Tensor:
    """``model(x, edge_index)`` with the soft edge mask ``edge_mask`` applied by ``route`` and the
    parameters in ``params`` (masked weights) substituted for the model's own."""
    call = (lambda *a, **k: torch.func.functional_call(model, params, a, k)) if params else model
    if edge_mask is None:
        return call(x, edge_index)
    if route == "edge_weight":
        return call(x, edge_index, edge_weight=edge_mask)
    with explain_masks(model, edge_mask, edge_index):
        return call(x, edge_index)


def weight_names(model: nn.Module, weights: list[str] | None) -> list[str]:
    """The parameters that get a weight mask: ``weights`` if given (checked), else every
    parameter with two or more dims (weight matrices, kernels, attention vectors; not biases)."""
    named = dict(model.named_parameters())
    if weights is None:
        names = [n for n, p in named.items() if p.dim() >= 2]
        if not names:
            raise ModelError(
                f"find_ticket: {type(model).__name__} has no parameter with 2 or more dims to mask; "
                f"name the parameters to prune with weights=[...]"
            )
        return names
    unknown = [n for n in weights if n not in named]
    if unknown:
        raise ModelError(
            f"find_ticket(weights=...): {type(model).__name__} has no parameter {unknown[0]!r}; "
            f"use names from model.named_parameters()"
        )
    return list(weights)


def prune_lowest(scores: Tensor, alive: Tensor, rate: float) -> Tensor:
    """Drop the ``int(n * rate) + 1`` entries of smallest ``|scores|`` among the ``n`` alive ones.

    The official code (``pruning.get_final_mask_epoch``) keeps ``|m| > sorted(|m|)[int(n*rate)]``,
    which drops ``int(n*rate) + 1`` entries when there are no ties; here ties are broken by
    position, so the count is always exactly that. Returns the new ``alive`` (bool).
    """
    idx = alive.nonzero().squeeze(1)
    n = idx.numel()
    if n == 0:
        return alive.clone()
    k = min(int(n * rate) + 1, n)
    order = torch.sort(scores.detach()[idx].abs(), stable=True).indices
    new = alive.clone()
    new[idx[order[:k]]] = False
    return new


def count_macs(model: nn.Module, x: Tensor, edge_index: Tensor) -> int:
    """Multiply-accumulates of one forward of ``model(x, edge_index)`` as it runs: every
    ``nn.Linear`` / PyG ``Linear`` counts ``nnz(weight) * rows``, every other parameter of two or
    more dims ``nnz * num_nodes`` once per call of its module, and every MessagePassing layer its
    messages' size (edges incl. self-loops x width). Pruned weights must be zero in ``model``."""
    from torch_geometric.nn.dense.linear import Linear as PygLinear

    total = [0]
    handles = []
    num_nodes = x.size(0)

    def linear_hook(module, inputs, output):
        inp = inputs[0]
        rows = inp.numel() // max(inp.shape[-1], 1)
        total[0] += int(torch.count_nonzero(module.weight)) * rows

    def other_hook(module, inputs, output):
        for p in module.parameters(recurse=False):
            if p.dim() >= 2:
                total[0] += int(torch.count_nonzero(p)) * num_nodes

    def message_hook(module, inputs, output):
        total[0] += output.numel()

    for module in model.modules():
        if isinstance(module, (nn.Linear, PygLinear)):
            handles.append(module.register_forward_hook(linear_hook))
        elif any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(other_hook))
    for layer in _message_passing_layers(model):
        handles.append(layer.register_message_forward_hook(message_hook))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x, edge_index)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return total[0]
