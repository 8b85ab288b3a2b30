"""The GCN of the unified graph lottery ticket paper (UGS / GLT): Chen, Sui, Chen, Zhang, Wang,
"A Unified Lottery Ticket Hypothesis for Graph Neural Networks" (ICML 2021).

Layout as in ALGORITHMS.md §2.4 of the shared design docs (official code:
VITA-Group/Unified-LTH-GNN, ``NodeClassification/net.py`` ``net_gcn`` and
``utils.torch_normalize_adj``), hidden size as in §2.6 (1433-512-7 on Cora):

- each layer **aggregates first, then transforms**: ``x = Â @ x; x = Linear(x)`` with a
  **bias-free** ``nn.Linear``; ReLU and dropout 0.5 (off in eval) after every layer but the last;
  no dropout on the input; 2 layers, hidden 512.
- ``Â = D A'^T D`` with ``A' = A ⊙ m + I``: self loops of weight 1 are added *after* the edge
  weights (the UGS edge mask) are applied, so they are never pruned; a self loop already present in
  the graph (CiteSeer has 124) keeps its own entry, so such a node gets weight 2.
- ``D = diag(rowsum(A')^-1/2)`` (0 where the sum is 0). The row sum is over the *source* of each
  directed edge (``degree="source"``, faithful to the official code). With an asymmetric mask that
  differs from PyG's ``gcn_norm``, which sums over the target; ``degree="target"`` gives PyG's
  convention. Both agree when the edge weights are symmetric.

PyG port (§2.4): the adjacency entry ``A_ji`` is the directed edge ``j -> i`` (source ``j``,
target ``i``) with ``edge_weight`` = its mask value, so node ``i`` receives
``A'_ji d_i d_j x_j``. The aggregation is PyG's ``SimpleConv(aggr="sum")`` on those normalised
weights. ``forward(x, edge_index, edge_weight=None)``; ``None`` means every edge has weight 1.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import require_pyg

require_pyg()
from torch_geometric.nn import SimpleConv
from torch_geometric.utils import add_self_loops, scatter

from .gnn import example_inputs  # noqa: F401  (same random graphs as the other node models)

Degree = Literal["source", "target"]
DEGREES = ("source", "target")


def ugs_norm(
    edge_index: Tensor, edge_weight: Tensor | None, num_nodes: int, degree: Degree = "source", dtype=None
) -> tuple[Tensor, Tensor]:
    """UGS's ``D (A ⊙ m + I)^T D`` as ``(edge_index, edge_weight)`` with the self loops appended.

    ``degree="source"`` sums each node's weights over the edges it is the source of (the row sums
    of the official dense adjacency); ``"target"`` over the edges it is the target of (PyG).
    """
    if degree not in DEGREES:
        raise ValueError(f"ugs_gcn degree must be one of {DEGREES}, got {degree!r}")
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device)
    edge_index, edge_weight = add_self_loops(edge_index, edge_weight, fill_value=1.0, num_nodes=num_nodes)
    src, dst = edge_index[0], edge_index[1]
    deg = scatter(edge_weight, src if degree == "source" else dst, dim=0, dim_size=num_nodes, reduce="sum")
    deg_inv_sqrt = deg.pow(-0.5)
    deg_inv_sqrt = deg_inv_sqrt.masked_fill(torch.isinf(deg_inv_sqrt), 0.0)
    return edge_index, deg_inv_sqrt[src] * edge_weight * deg_inv_sqrt[dst]


class UGSGCN(nn.Module):
    """UGS's GCN: per layer ``Linear(Â x)`` without bias; ReLU and dropout between layers."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden: int = 512,
        num_layers: int = 2,
        dropout: float = 0.5,
        degree: Degree = "source",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ugs_gcn needs num_layers >= 1, got {num_layers}")
        if degree not in DEGREES:
            raise ValueError(f"ugs_gcn degree must be one of {DEGREES}, got {degree!r}")
        self.dropout = dropout
        self.degree = degree
        self.propagate = SimpleConv(aggr="sum")
        dims = [num_features] + [hidden] * (num_layers - 1) + [num_classes]
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        edge_index, norm = ugs_norm(edge_index, edge_weight, x.size(0), self.degree, dtype=x.dtype)
        last = len(self.layers) - 1
        for i, linear in enumerate(self.layers):
            x = linear(self.propagate(x, edge_index, norm))
            if i < last:
                x = F.dropout(x.relu(), p=self.dropout, training=self.training)
        return x


def build(
    num_features: int = 16,
    num_classes: int = 10,
    hidden: int = 512,
    num_layers: int = 2,
    dropout: float = 0.5,
    degree: Degree = "source",
) -> nn.Module:
    """Build the UGS GCN (ALGORITHMS.md §2.4; Cora: ``build(1433, 7)``)."""
    return UGSGCN(num_features, num_classes, hidden, num_layers, dropout, degree)
