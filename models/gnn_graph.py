"""Graph-classification GIN: Xu et al., "How Powerful are Graph Neural Networks?" (ICLR 2019),
laid out as PyG's ``examples/mutag_gin.py``.

Three ``GINConv`` layers, each ``nn`` a 2-layer MLP with BatchNorm inside
(``Linear, BatchNorm1d, ReLU, Linear``), ReLU after each convolution; ``global_add_pool`` (the
paper's sum readout; ``pool="mean"`` for ``global_mean_pool``) over the ``batch`` vector; then an
MLP classifier ``Linear, ReLU, Dropout(0.5), Linear``.

``forward(x, edge_index, batch) -> [num_graphs, num_classes]``; ``batch[i]`` is the graph node
``i`` belongs to, as in a PyG ``Batch``. The number of graphs is ``int(batch.max()) + 1``, read
from the data inside the pooling op.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from torch import Tensor

from . import require_pyg

require_pyg()
from torch_geometric.nn import GINConv, global_add_pool, global_mean_pool

from .gnn import gin_mlp, random_graphs

POOLS = {"add": global_add_pool, "mean": global_mean_pool}


class GraphGIN(nn.Module):
    """GIN for graph classification: GINConv x ``num_layers``, global pooling, MLP classifier."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden: int = 32,
        num_layers: int = 3,
        pool: Literal["add", "mean"] = "add",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"gin_graph pool must be one of {sorted(POOLS)}, got {pool!r}")
        if num_layers < 1:
            raise ValueError(f"gin_graph needs num_layers >= 1, got {num_layers}")
        self.pool = POOLS[pool]
        dims = [num_features] + [hidden] * num_layers
        self.convs = nn.ModuleList(GINConv(gin_mlp(i, hidden, hidden)) for i in dims[:-1])
        self.classifier = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x, edge_index).relu()
        return self.classifier(self.pool(x, batch))


def build(
    num_features: int = 16,
    num_classes: int = 10,
    hidden: int = 32,
    num_layers: int = 3,
    pool: Literal["add", "mean"] = "add",
    dropout: float = 0.5,
) -> nn.Module:
    """Build the graph-classification GIN (``pool`` is ``"add"`` or ``"mean"``)."""
    return GraphGIN(num_features, num_classes, hidden, num_layers, pool, dropout)


def example_inputs(
    batch: int = 3, num_features: int = 16, num_nodes: int | None = None
) -> tuple[Tensor, ...]:
    """``(x, edge_index, batch_vector)`` for ``batch`` random graphs of 12-30 nodes each (or
    ``num_nodes`` each), merged as a PyG ``Batch``."""
    return random_graphs(batch, num_features, num_nodes)
