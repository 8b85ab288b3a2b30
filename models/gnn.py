"""Node-classification GNNs built from PyTorch Geometric layers: GCN, GraphSAGE, GIN, GAT, GATv2.

Every model is ``forward(x, edge_index) -> [num_nodes, num_classes]`` logits, two message-passing
layers deep, laid out as in the papers' Planetoid setups and PyG's examples:

- ``gcn``: Kipf & Welling, "Semi-Supervised Classification with Graph Convolutional Networks"
  (ICLR 2017); PyG ``examples/gcn.py``: dropout 0.5, ``GCNConv`` (hidden 16), ReLU, dropout 0.5,
  ``GCNConv``. ``forward`` also takes an optional ``edge_weight``.
- ``graphsage``: Hamilton et al., "Inductive Representation Learning on Large Graphs"
  (NeurIPS 2017): ``SAGEConv`` with mean aggregation, ReLU, dropout 0.5, ``SAGEConv``.
- ``gin``: Xu et al., "How Powerful are Graph Neural Networks?" (ICLR 2019): ``GINConv`` whose
  ``nn`` is a 2-layer MLP ``Linear, BatchNorm1d, ReLU, Linear``; ReLU and dropout 0.5 between
  the two convolutions.
- ``gat``: Velickovic et al., "Graph Attention Networks" (ICLR 2018); PyG ``examples/gat.py``:
  dropout 0.6, ``GATConv`` with 8 heads x 8 hidden (concatenated, attention dropout 0.6), ELU,
  dropout 0.6, ``GATConv`` with 1 head and ``concat=False``.
- ``gatv2``: Brody et al., "How Attentive are Graph Attention Networks?" (ICLR 2022): the ``gat``
  layout with ``GATv2Conv``.

``example_inputs`` returns a small random undirected graph (the disjoint union of ``batch`` random
graphs of 12-30 nodes each) that every model here and in :mod:`models.gnn_graph` accepts.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import require_pyg

require_pyg()
from torch_geometric.nn import GATConv, GATv2Conv, GCNConv, GINConv, SAGEConv
from torch_geometric.utils import to_undirected

ARCHITECTURES = ("gcn", "graphsage", "gin", "gat", "gatv2")


class GCN(nn.Module):
    """Two ``GCNConv`` layers with ReLU and dropout (Kipf & Welling 2017)."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 16, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = dropout
        self.conv1 = GCNConv(num_features, hidden)
        self.conv2 = GCNConv(hidden, num_classes)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = self.conv1(x, edge_index, edge_weight).relu()
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.conv2(x, edge_index, edge_weight)


class GraphSAGE(nn.Module):
    """Two ``SAGEConv`` layers (mean aggregation) with ReLU and dropout (Hamilton et al. 2017)."""

    def __init__(
        self, num_features: int, num_classes: int, hidden: int = 16, dropout: float = 0.5, aggr: str = "mean"
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.conv1 = SAGEConv(num_features, hidden, aggr=aggr)
        self.conv2 = SAGEConv(hidden, num_classes, aggr=aggr)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = self.conv1(x, edge_index).relu()
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.conv2(x, edge_index)


def gin_mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """The MLP inside a ``GINConv``: ``Linear, BatchNorm1d, ReLU, Linear``."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_features)
    )


class GIN(nn.Module):
    """Two ``GINConv`` layers, each with a 2-layer MLP and BatchNorm inside (Xu et al. 2019)."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 16, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = dropout
        self.conv1 = GINConv(gin_mlp(num_features, hidden, hidden), train_eps=True)
        self.conv2 = GINConv(gin_mlp(hidden, hidden, num_classes), train_eps=True)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = self.conv1(x, edge_index).relu()
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.conv2(x, edge_index)


class GAT(nn.Module):
    """Multi-head graph attention as in the GAT paper's transductive setup and PyG ``examples/gat.py``.

    ``conv="gatv2"`` swaps in ``GATv2Conv`` (Brody et al. 2022) with the same layout.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden: int = 8,
        heads: int = 8,
        dropout: float = 0.6,
        conv: Literal["gat", "gatv2"] = "gat",
    ) -> None:
        super().__init__()
        if conv not in ("gat", "gatv2"):
            raise ValueError(f"GAT conv must be 'gat' or 'gatv2', got {conv!r}")
        Conv = GATConv if conv == "gat" else GATv2Conv
        self.dropout = dropout
        self.conv1 = Conv(num_features, hidden, heads=heads, dropout=dropout)
        self.conv2 = Conv(hidden * heads, num_classes, heads=1, concat=False, dropout=dropout)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = F.elu(self.conv1(x, edge_index))
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.conv2(x, edge_index)


def build(
    arch: Literal["gcn", "graphsage", "gin", "gat", "gatv2"] = "gcn",
    num_features: int = 16,
    num_classes: int = 10,
    hidden: int | None = None,
    **cfg,
) -> nn.Module:
    """Build node-classification GNN ``arch`` (one of :data:`ARCHITECTURES`).

    ``hidden`` defaults to 16 for ``gcn``/``graphsage``/``gin`` and to 8 channels per head for
    ``gat``/``gatv2``; ``cfg`` goes to the model class (``dropout``, ``heads``, ``aggr``).
    """
    if arch == "gcn":
        return GCN(num_features, num_classes, hidden=hidden or 16, **cfg)
    if arch == "graphsage":
        return GraphSAGE(num_features, num_classes, hidden=hidden or 16, **cfg)
    if arch == "gin":
        return GIN(num_features, num_classes, hidden=hidden or 16, **cfg)
    if arch in ("gat", "gatv2"):
        return GAT(num_features, num_classes, hidden=hidden or 8, conv=arch, **cfg)
    raise ValueError(f"unknown GNN arch {arch!r}; choose one of {ARCHITECTURES}")


def random_edge_index(num_nodes: int, avg_degree: float = 4.0) -> Tensor:
    """A random undirected ``edge_index`` ``[2, E]`` on ``num_nodes`` nodes: both directions of each
    edge, no self loops, no duplicates. Uses torch's global RNG."""
    if num_nodes < 2:
        raise ValueError(f"a random graph needs at least 2 nodes, got num_nodes={num_nodes}")
    num_pairs = max(1, int(num_nodes * avg_degree / 2))
    src = torch.randint(0, num_nodes, (num_pairs,))
    # an offset in [1, num_nodes) never maps a node onto itself
    dst = (src + torch.randint(1, num_nodes, (num_pairs,))) % num_nodes
    return to_undirected(torch.stack([src, dst]), num_nodes=num_nodes)


def random_graphs(
    batch: int = 1, num_features: int = 16, num_nodes: int | None = None, avg_degree: float = 4.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The disjoint union of ``batch`` random undirected graphs, as PyG batches graphs.

    Each graph has ``num_nodes`` nodes, or a random count in [12, 30] when ``num_nodes`` is None.
    Returns ``(x [N, num_features], edge_index [2, E], batch [N])``, where ``batch[i]`` is the
    graph node ``i`` belongs to.
    """
    if batch < 1:
        raise ValueError(f"batch (number of graphs) must be >= 1, got {batch}")
    xs, edges, owners, offset = [], [], [], 0
    for g in range(batch):
        n = num_nodes if num_nodes is not None else int(torch.randint(12, 31, ()).item())
        xs.append(torch.randn(n, num_features))
        edges.append(random_edge_index(n, avg_degree) + offset)
        owners.append(torch.full((n,), g, dtype=torch.long))
        offset += n
    return torch.cat(xs), torch.cat(edges, dim=1), torch.cat(owners)


def example_inputs(
    batch: int = 1, num_features: int = 16, num_nodes: int | None = None
) -> tuple[Tensor, ...]:
    """``(x, edge_index)`` for one random graph, or the disjoint union of ``batch`` of them
    (12-30 nodes each unless ``num_nodes`` is given)."""
    x, edge_index, _ = random_graphs(batch, num_features, num_nodes)
    return x, edge_index
