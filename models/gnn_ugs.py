"""The GCN, GIN and GAT of the unified graph lottery ticket paper (UGS / GLT): Chen, Sui, Chen,
Zhang, Wang, "A Unified Lottery Ticket Hypothesis for Graph Neural Networks" (ICML 2021).

GCN (``build``, ``build_fast``, :class:`UGSGCN`):

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

Speed (``order=``, sparse ``x``): ``order="aggregate"`` (default) is the official layout above;
``order="transform"`` computes ``Â (X W)`` per layer instead of ``(Â X) W``. The two are equal in
exact arithmetic (the product is associative) and agree to float rounding; transform-first
passes 512-wide instead of 1433-wide messages on Cora, and the first layer's ``X W`` can use a
sparse ``x`` (``torch.sparse`` COO or CSR; Cora's features are 98.7% zeros). A sparse ``x`` is
accepted in both orders: transform-first multiplies it as a sparse product
(:class:`SparseInputLinear`; its gradient reaches ``W``, not ``x``), aggregate-first densifies it
first (``x.to_dense()``; no speed-up). GIN takes the same ``order=`` and sparse ``x``; GAT is
transform-first by construction and takes a sparse ``x`` too.
``build_fast`` / ``sparse_features`` give the fast configuration, which also uses:

- ``aggregation="spmm"``: the weighted sum over edges as a CSR sparse-matrix product
  (:class:`EdgeSum`) instead of PyG's materialised ``E x width`` messages. Same sum, different
  rounding; its backward gives ``edge_weight`` the exact gradient ``<dL/dout_i, h_j>`` per edge
  ``j -> i`` by ``torch.sparse.sampled_addmm``. Whenever a PyG hook is registered on the layer
  (``count_macs``'s message hook, the explain masks) or the layer is traced, it falls back to
  PyG's message passing, so those see the messages exactly as in the official layout.
- ``fast_dropout=True``: dropout as ``x * (U(0, 1) >= p) / (1 - p)``, the same distribution as
  ``F.dropout`` (each entry kept with probability ``1 - p``, scaled by ``1 / (1 - p)``) but drawn
  by ``torch.rand`` (``F.dropout``'s ``bernoulli_`` is 4-5x slower on CPU). The random stream
  differs, so a seeded run of the fast model does not draw the same dropout masks as the official
  one; the model itself is the same.

GIN (``ugs_gin``, :class:`UGSGIN`; official ``gnns/gin_net.py``, ``gin_layer.py``, ALGORITHMS.md
§2.5): 2 layers ``h <- dropout(relu(Linear((1 + eps_l) h + mean_{j->i}(m_e h_j))), 0.5)``,
bias-free Linears 1433-512 and 512-7, ``eps_l`` learnable from 0, no input dropout, output
``(linears_prediction(h1) + h2) / 2`` (``linears_prediction`` 512-7, bias-free). As in the
official code the ReLU and dropout also follow the second layer (its 7 class scores). The mean
divides by the number of edges passed into a node, whatever their mask (DGL's ``fn.mean`` over
``src_mul_edge`` messages), a node without in-edges gets 0. The edge mask is ``edge_weight``
(one entry per directed edge, no self-loops). Official weight masks: the two GIN linears only
(``UGSGIN.ugs_weights``; pass them as ``find_ticket(weights=...)``).

GAT (``ugs_gat``, :class:`UGSGAT`; official ``gnns/gat_net.py``, ``gat_layer.py``): layer 1 has 8
heads x 512 (``fc1`` = the 8 heads' bias-free ``fc`` stacked, head ``k`` = rows ``512k..``;
``attn1[k]`` = head ``k``'s ``attn_fc`` weight ``[a_src || a_dst]``), concatenated to 4096,
attention dropout 0.6, then ELU and dropout 0.6; layer 2 is one head 4096-7 without any dropout;
no input dropout. ``e_(j->i) = leaky_relu(a . [z_j || z_i])`` with slope **0.01** (the official
``F.leaky_relu`` default, not the GAT paper's 0.2); the logit ``e`` is computed as
``a_src . z_j + a_dst . z_i`` (equal to the concatenation in exact arithmetic). Edge mask: the
official mask has ``E + N`` entries, the graph's edges then one self-loop per node, all masked and
pruned. Here ``edge_weight`` has one entry per column of ``edge_index``: with
``self_loops="given"`` and :func:`with_self_loops` data that is exactly the official ``E + N``
layout; with ``self_loops="add"`` (default) the model appends one self-loop of weight 1 per node,
never masked (the GCN's convention), and the mask covers the ``E`` graph edges only. **Quirk
(default)**: the mask multiplies the logit before the softmax, so a pruned edge gets logit 0 (not
-inf) and still passes its message. ``clean=True``: attention ``m exp(e) / sum m exp(e)``, so a
zero mask removes the edge exactly (equal to deleting it) and a soft mask reweights it. Weight
masks: ``fc1``, ``attn1``, ``fc2``, ``attn2`` (every parameter; the official ``fc`` and
``attn_fc`` of every head).

Deviations from the official GIN / GAT code, all deliberate:
- ``find_ticket``'s fixed-mask stage trains on the graph with the pruned edges removed. For GIN's
  mean and GAT's quirk that differs from the official binary mask on the full graph, so both
  models have ``set_full_graph(edge_index)``: afterwards a subset of that graph runs as the full
  graph with the missing edges masked to 0 (the official semantics, in every stage).
- The official GIN / GAT training loop calls ``net.eval()`` each epoch and never ``net.train()``
  again, so dropout is active only in the first epoch of each stage; ``find_ticket`` trains with
  dropout in every epoch (as the official GCN does). Not reproduced on purpose.
- DGL's edge order and per-head modules are replaced by PyG's ``edge_index`` columns and stacked
  weights; initialisation follows ``nn.Linear``'s default per head (same distribution, other
  draws). The official layers' unused BatchNorm modules (``batch_norm=False``) are left out.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import require_pyg

require_pyg()
from torch_geometric.nn import SimpleConv
from torch_geometric.utils import add_self_loops, scatter
from torch_geometric.utils import softmax as pyg_softmax

from .gnn import example_inputs  # noqa: F401  (same random graphs as the other node models)

Degree = Literal["source", "target"]
DEGREES = ("source", "target")
Order = Literal["aggregate", "transform"]
ORDERS = ("aggregate", "transform")


def _is_sparse(x) -> bool:
    """Whether ``x`` is a ``torch.sparse`` tensor (COO, CSR, ...); False for tracing proxies."""
    return isinstance(x, Tensor) and x.layout != torch.strided


def sparse_features(x: Tensor, layout: torch.layout = torch.sparse_csr) -> Tensor:
    """``x`` as a ``torch.sparse`` tensor (``torch.sparse_coo`` or ``torch.sparse_csr``) for the
    transform-first models: their first layer then computes ``X W`` with ``torch.sparse.mm``."""
    if layout == torch.sparse_coo:
        return x.to_sparse_coo().coalesce()
    if layout == torch.sparse_csr:
        return x.to_sparse_csr()
    raise ValueError(f"sparse_features layout must be torch.sparse_coo or torch.sparse_csr, got {layout}")


def _csr(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, n_cols: int) -> tuple[Tensor, Tensor]:
    """A CSR matrix with ``values[k]`` at ``(rows[k], cols[k])`` (duplicates kept as separate
    entries) and the permutation that sorted the entries into CSR order."""
    perm = torch.argsort(rows * n_cols + cols, stable=True)
    crow = torch.ops.aten._convert_indices_from_coo_to_csr(rows[perm], n_rows)
    return torch.sparse_csr_tensor(crow, cols[perm], values[perm], (n_rows, n_cols)), perm


class _EdgeSumFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, h: Tensor, src: Tensor, dst: Tensor, num_nodes: int) -> Tensor:
        a, perm = _csr(dst, src, weight, num_nodes, h.size(0))
        ctx.save_for_backward(weight, h, src, dst)
        ctx.num_nodes = num_nodes
        ctx.a, ctx.perm = a, perm
        return a @ h

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, h, src, dst = ctx.saved_tensors
        grad_w = grad_h = None
        grad = grad.contiguous()
        if ctx.needs_input_grad[0]:  # d out_i / d w_(j->i) = h_j: a sampled grad @ h^T at the edges
            sampled = torch.sparse.sampled_addmm(ctx.a, grad, h.t(), beta=0.0, alpha=1.0).values()
            grad_w = torch.empty_like(sampled).scatter_(0, ctx.perm, sampled)
        if ctx.needs_input_grad[1]:
            at, _ = _csr(src, dst, weight, h.size(0), ctx.num_nodes)
            grad_h = at @ grad
        ctx.a = ctx.perm = None
        return grad_w, grad_h, None, None, None


def edge_sum(h: Tensor, edge_index: Tensor, edge_weight: Tensor, num_nodes: int | None = None) -> Tensor:
    """``out_i = sum over edges j -> i of edge_weight * h_j`` as a CSR sparse-matrix product, with
    gradients to ``h`` and ``edge_weight`` (what ``SimpleConv(aggr="sum")`` computes, without the
    ``E x width`` messages)."""
    n = h.size(0) if num_nodes is None else num_nodes
    return _EdgeSumFn.apply(edge_weight.to(h.dtype).contiguous(), h.contiguous(), edge_index[0], edge_index[1], n)


class EdgeSum(SimpleConv):
    """``SimpleConv(aggr="sum")`` with edge weights; ``spmm=True`` computes it by :func:`edge_sum`
    unless a PyG hook or explain mask is set on the layer or its input is being traced (then PyG's
    message passing runs, as without ``spmm``)."""

    def __init__(self, spmm: bool = False) -> None:
        super().__init__(aggr="sum")
        self.spmm = spmm

    def _hooked(self) -> bool:
        return bool(self.explain) or any(getattr(self, name) for name in vars(self) if name.endswith("_hooks")
                                         and isinstance(getattr(self, name), dict))

    def forward(self, x, edge_index, edge_weight=None, size=None):
        if (self.spmm and isinstance(x, Tensor) and x.layout == torch.strided and edge_weight is not None
                and not torch.compiler.is_compiling() and not self._hooked()):
            return edge_sum(x, edge_index, edge_weight)
        return super().forward(x, edge_index, edge_weight, size)


def dropout(x: Tensor, p: float, training: bool, fast: bool = False) -> Tensor:
    """``F.dropout``; ``fast=True`` draws the keep mask as ``torch.rand(x) >= p`` (same
    distribution, different random stream, 4-5x faster on CPU)."""
    if not fast or not training or p == 0.0:
        return F.dropout(x, p=p, training=training)
    if p >= 1.0:
        return torch.zeros_like(x)
    return x * (torch.rand_like(x) >= p).to(x.dtype) * (1.0 / (1.0 - p))


class _SparseMatmulFn(torch.autograd.Function):
    """``x @ w.t()`` for a constant sparse ``x``; the backward ``(x^T @ grad)^T`` uses a CSR copy
    of ``x^T`` (autograd's own CSR backward is several times slower)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.x = x
        return x @ w.t().contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, ctx.x = ctx.x, None
        xt = x.t().to_sparse_csr() if x.layout != torch.sparse_coo else x.t().coalesce()
        return None, (xt @ grad.contiguous()).t()


class SparseInputLinear(nn.Linear):
    """``nn.Linear`` that also takes a 2-D ``torch.sparse`` input (``x @ W^T`` by a sparse
    product, plus the bias if any; the gradient reaches the weight, not ``x``); a dense input
    takes ``nn.Linear``'s own path."""

    def forward(self, x: Tensor) -> Tensor:
        if not _is_sparse(x):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"SparseInputLinear takes a 2-D sparse input, got {x.dim()}-D; densify it first")
        if x.requires_grad:
            raise ValueError("SparseInputLinear: a sparse x that requires grad is not supported; pass x "
                             "without requires_grad or a dense x")
        out = _SparseMatmulFn.apply(x, self.weight)
        return out if self.bias is None else out + self.bias


AGGREGATIONS = ("messages", "spmm")


def _check_aggregation(model: str, aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"{model} aggregation must be one of {AGGREGATIONS} ('messages' = PyG message passing, "
                         f"'spmm' = the same sum as a sparse-matrix product), got {aggregation!r}")


def _check_order(model: str, order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"{model} order must be one of {ORDERS} ('aggregate' = the official layout, "
                         f"'transform' = the same product computed as A(XW), faster), got {order!r}")


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
    """UGS's GCN: per layer ``Linear(Â x)`` without bias; ReLU and dropout between layers.

    ``order="transform"`` computes each layer as ``Â Linear(x)`` (equal in exact arithmetic);
    ``x`` may be a ``torch.sparse`` tensor (see the module docstring).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden: int = 512,
        num_layers: int = 2,
        dropout: float = 0.5,
        degree: Degree = "source",
        order: Order = "aggregate",
        aggregation: str = "messages",
        fast_dropout: bool = False,
    ) -> None:
        super().__init__()
        _check_order("ugs_gcn", order)
        _check_aggregation("ugs_gcn", aggregation)
        if num_layers < 1:
            raise ValueError(f"ugs_gcn needs num_layers >= 1, got {num_layers}")
        if degree not in DEGREES:
            raise ValueError(f"ugs_gcn degree must be one of {DEGREES}, got {degree!r}")
        self.dropout = dropout
        self.degree = degree
        self.order = order
        self.fast_dropout = fast_dropout
        self.propagate = EdgeSum(spmm=aggregation == "spmm")
        dims = [num_features] + [hidden] * (num_layers - 1) + [num_classes]
        self.layers = nn.ModuleList(SparseInputLinear(i, o, bias=False) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        if _is_sparse(x) and self.order == "aggregate":
            x = x.to_dense()
        edge_index, norm = ugs_norm(edge_index, edge_weight, x.size(0), self.degree, dtype=x.dtype)
        last = len(self.layers) - 1
        for i, linear in enumerate(self.layers):
            if self.order == "transform":
                x = self.propagate(linear(x), edge_index, norm)
            else:
                x = linear(self.propagate(x, edge_index, norm))
            if i < last:
                x = dropout(x.relu(), self.dropout, self.training, self.fast_dropout)
        return x


def build(
    num_features: int = 16,
    num_classes: int = 10,
    hidden: int = 512,
    num_layers: int = 2,
    dropout: float = 0.5,
    degree: Degree = "source",
    order: Order = "aggregate",
) -> nn.Module:
    """Build the UGS GCN (ALGORITHMS.md §2.4; Cora: ``build(1433, 7)``); ``order="transform"``
    for the faster, equal-in-exact-arithmetic layout."""
    return UGSGCN(num_features, num_classes, hidden, num_layers, dropout, degree, order)


def build_fast(num_features: int = 16, num_classes: int = 10, hidden: int = 512, num_layers: int = 2,
               dropout: float = 0.5, degree: Degree = "source") -> nn.Module:
    """The UGS GCN computed fast: transform-first, sparse-matrix aggregation, ``torch.rand``
    dropout (``order="transform", aggregation="spmm", fast_dropout=True``); give it a sparse
    ``x`` (:func:`sparse_features`, CSR) for the full speed-up. Same model as :func:`build`."""
    return UGSGCN(num_features, num_classes, hidden, num_layers, dropout, degree, "transform", "spmm", True)


def with_self_loops(data: Any) -> Any:
    """A copy of ``data`` with one self-loop per node appended to ``edge_index`` (after the
    graph's own edges, as the official GAT's ``g.add_edges(range(N), range(N))``), so that an edge
    mask over its columns has the official GAT's length ``E + N`` and masks the self-loops too.
    Other per-edge attributes are not extended: the copy drops them."""
    out = data.clone()
    n = data.num_nodes
    loops = torch.arange(n, device=data.edge_index.device).repeat(2, 1)
    for key in list(out.edge_attrs()):
        if key != "edge_index":
            del out[key]
    out.edge_index = torch.cat([data.edge_index, loops], dim=1)
    return out


class _FullGraph:
    """``set_full_graph(edge_index)``: later calls whose ``edge_index`` is a subset of that graph
    (a ticket's graph with the pruned edges removed) run on the full graph with the missing edges
    masked to 0, as the official code's fixed-mask stage does (binary masks, nothing removed).
    Matters where a masked edge still counts: GIN's mean denominator, GAT's logit quirk."""

    full_graph: Tensor | None = None

    def set_full_graph(self, edge_index: Tensor | None) -> None:
        """Make ``edge_index`` the graph every call runs on (``None`` clears it)."""
        if edge_index is None:
            self.full_graph = self._full_keys = None
            return
        n = int(edge_index.max()) + 1 if edge_index.numel() else 1
        keys = edge_index[0] * n + edge_index[1]
        sorted_keys, order = torch.sort(keys)
        if bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
            raise ValueError(f"{type(self).__name__}.set_full_graph: edge_index has duplicate edges, so a "
                             f"subset of it does not say which copy was kept; pass a graph without duplicates")
        self.full_graph, self._full_keys, self._full_n = edge_index, (sorted_keys, order), n

    def _on_full_graph(self, edge_index: Tensor, edge_weight: Tensor | None, dtype) -> tuple[Tensor, Tensor | None]:
        full = self.full_graph
        if full is None or (edge_index.shape == full.shape and (edge_index is full or torch.equal(edge_index, full))):
            return edge_index, edge_weight
        sorted_keys, order = self._full_keys
        n = self._full_n
        keys = edge_index[0] * n + edge_index[1]
        pos = torch.searchsorted(sorted_keys, keys).clamp_max(sorted_keys.numel() - 1)
        if edge_index.numel() and (int(edge_index.max()) >= n or not bool((sorted_keys[pos] == keys).all())):
            raise ValueError(f"{type(self).__name__}: edge_index holds an edge that is not in the graph given to "
                             f"set_full_graph; pass a subset of that graph, or call set_full_graph(None)")
        w = torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device) if edge_weight is None \
            else edge_weight.to(dtype)
        full_w = torch.zeros(full.size(1), dtype=dtype, device=full.device).index_add(0, order[pos], w)
        return full, full_w


class UGSGIN(_FullGraph, nn.Module):
    """UGS's GIN (official ``gnns/gin_net.py`` / ``gin_layer.py``, DGL): two layers of
    ``h <- dropout(relu(Linear((1 + eps) h + mean_{j->i}(m_e h_j))))`` (bias-free Linears, eps
    learnable from 0, one per layer), output ``(linears_prediction(h1) + h2) / 2``. The mean divides
    by the number of edges into ``i`` that were passed, masked or not (the official ``fn.mean``
    over ``src_mul_edge`` messages). See the module docstring for what find_ticket masks."""

    ugs_weights = ("ginlayers.0.weight", "ginlayers.1.weight")

    def __init__(self, num_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.5,
                 order: Order = "aggregate", aggregation: str = "messages", fast_dropout: bool = False) -> None:
        super().__init__()
        _check_order("ugs_gin", order)
        _check_aggregation("ugs_gin", aggregation)
        self.dropout, self.order, self.fast_dropout = dropout, order, fast_dropout
        self.ginlayers = nn.ModuleList([SparseInputLinear(num_features, hidden, bias=False),
                                        SparseInputLinear(hidden, num_classes, bias=False)])
        self.eps = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(2)])
        self.linears_prediction = nn.Linear(hidden, num_classes, bias=False)
        self.propagate = EdgeSum(spmm=aggregation == "spmm")

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        if _is_sparse(x) and self.order == "aggregate":
            x = x.to_dense()
        edge_index, edge_weight = self._on_full_graph(edge_index, edge_weight, x.dtype)
        n, dst = x.size(0), edge_index[1]
        ones = torch.ones(edge_index.size(1), dtype=x.dtype, device=edge_index.device)
        indeg = scatter(ones, dst, dim=0, dim_size=n, reduce="sum")  # every passed edge counts
        norm = (ones if edge_weight is None else edge_weight.to(x.dtype)) / indeg[dst]
        reps = []
        h = x
        for eps, linear in zip(self.eps, self.ginlayers):
            if self.order == "transform":
                z = linear(h)
                h = (1 + eps) * z + self.propagate(z, edge_index, norm)
            else:
                h = linear((1 + eps) * h + self.propagate(h, edge_index, norm))
            h = dropout(h.relu(), self.dropout, self.training, self.fast_dropout)
            reps.append(h)
        return (self.linears_prediction(reps[0]) + reps[1]) / 2


class UGSGAT(_FullGraph, nn.Module):
    """UGS's GAT (official ``gnns/gat_net.py`` / ``gat_layer.py``, DGL): layer 1 has ``heads``
    heads of ``hidden`` channels (concatenated), attention dropout 0.6, then ELU and dropout 0.6;
    layer 2 one head to the classes, no dropout. Per head: ``z = fc(h)`` (bias-free),
    ``e_(j->i) = leaky_relu(a . [z_j || z_i], 0.01)``, attention = softmax of ``e`` over the edges
    into ``i``, output ``sum_j alpha z_j``. The edge mask ``m`` multiplies the logit ``e`` before the
    softmax (official quirk: a masked edge gets logit 0, not -inf, and still passes its message);
    ``clean=True`` weights ``exp(e)`` by ``m`` instead, so a zero mask removes the edge exactly.
    ``self_loops="add"`` appends a self-loop of weight 1 per node (never masked); ``"given"`` uses
    ``edge_index`` as passed (use :func:`with_self_loops` for the official ``E + N`` mask)."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 512, heads: int = 8,
                 dropout: float = 0.6, negative_slope: float = 0.01, clean: bool = False, self_loops: str = "add",
                 aggregation: str = "messages", fast_dropout: bool = False) -> None:
        super().__init__()
        _check_aggregation("ugs_gat", aggregation)
        if self_loops not in ("add", "given"):
            raise ValueError(f"ugs_gat self_loops must be 'add' (append one unmasked self-loop per node) or "
                             f"'given' (edge_index already holds them, masked like any edge), got {self_loops!r}")
        self.hidden, self.heads, self.num_classes = hidden, heads, num_classes
        self.dropout, self.negative_slope, self.clean = dropout, negative_slope, clean
        self.self_loops, self.fast_dropout = self_loops, fast_dropout
        self.fc1 = SparseInputLinear(num_features, heads * hidden, bias=False)  # head k: rows k*hidden...
        self.attn1 = nn.Parameter(torch.empty(heads, 2 * hidden))  # per head [a_src || a_dst]
        self.fc2 = SparseInputLinear(heads * hidden, num_classes, bias=False)
        self.attn2 = nn.Parameter(torch.empty(1, 2 * num_classes))
        for a in (self.attn1, self.attn2):  # nn.Linear(2 * out, 1)'s default init
            bound = 1.0 / math.sqrt(a.size(1))
            nn.init.uniform_(a, -bound, bound)
        self.propagate = EdgeSum(spmm=aggregation == "spmm")

    def attention(self, zt: Tensor, a: Tensor, edge_index: Tensor, mask: Tensor | None) -> Tensor:
        """Per-edge, per-head attention ``(E, heads)`` of one layer (before attention dropout);
        ``zt``: the transformed features per head, ``(heads, N, width)``."""
        src, dst = edge_index
        heads, n, width = zt.shape
        scores = torch.bmm(zt, a.view(heads, 2, width).transpose(1, 2)).transpose(0, 1)  # (N, heads, 2)
        e = F.leaky_relu(scores[:, :, 0][src] + scores[:, :, 1][dst], self.negative_slope)
        if mask is None:
            return pyg_softmax(e, dst, num_nodes=n)
        mask = mask.to(e.dtype).unsqueeze(-1)
        if not self.clean:
            return pyg_softmax(e * mask, dst, num_nodes=n)
        # clean: alpha = m exp(e) / sum m exp(e); the shift is the max over edges with m != 0
        shift = scatter(e.detach().masked_fill(mask == 0, float("-inf")), dst, dim=0, dim_size=n, reduce="max")
        shift = shift.masked_fill(torch.isinf(shift), 0.0)
        num = mask * torch.exp(e - shift[dst])
        den = scatter(num, dst, dim=0, dim_size=n, reduce="sum")
        return num / den[dst].clamp_min(torch.finfo(e.dtype).tiny)

    def layer(self, h, fc, a, heads, width, edge_index, mask, p):
        zt = fc(h).view(-1, heads, width).transpose(0, 1).contiguous()  # (heads, N, width)
        alpha = dropout(self.attention(zt, a, edge_index, mask), p, self.training, self.fast_dropout)
        per_head = torch.unbind(zt, 0)  # backward stacks once (indexing per head would zero-fill each time)
        weights = torch.unbind(alpha.t().contiguous(), 0)
        return torch.cat([self.propagate(zk, edge_index, wk) for zk, wk in zip(per_head, weights)], dim=-1)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        edge_index, edge_weight = self._on_full_graph(edge_index, edge_weight, x.dtype)
        if self.self_loops == "add":
            n = x.size(0)
            if edge_weight is None:
                edge_index, _ = add_self_loops(edge_index, num_nodes=n)
            else:
                edge_index, edge_weight = add_self_loops(edge_index, edge_weight, fill_value=1.0, num_nodes=n)
        h = self.layer(x, self.fc1, self.attn1, self.heads, self.hidden, edge_index, edge_weight, self.dropout)
        h = dropout(F.elu(h), self.dropout, self.training, self.fast_dropout)
        return self.layer(h, self.fc2, self.attn2, 1, self.num_classes, edge_index, edge_weight, 0.0)


def ugs_gin(num_features: int = 16, num_classes: int = 10, hidden: int = 512, dropout: float = 0.5,
            order: Order = "aggregate", aggregation: str = "messages", fast_dropout: bool = False) -> UGSGIN:
    """UGS's GIN (ALGORITHMS.md §2.5; Cora: ``ugs_gin(1433, 7)``). Prune with
    ``find_ticket(..., weights=list(model.ugs_weights))`` (the official masks sit on the two GIN
    linears only). ``order="transform", aggregation="spmm", fast_dropout=True`` is the fast layout."""
    return UGSGIN(num_features, num_classes, hidden, dropout, order, aggregation, fast_dropout)


def ugs_gat(num_features: int = 16, num_classes: int = 10, hidden: int = 512, heads: int = 8, dropout: float = 0.6,
            clean: bool = False, self_loops: str = "add", aggregation: str = "messages",
            fast_dropout: bool = False) -> UGSGAT:
    """UGS's GAT (ALGORITHMS.md §2.5; Cora: ``ugs_gat(1433, 7)``, 8 heads x 512). The official
    logit-mask quirk by default, ``clean=True`` for exact edge removal; ``self_loops="given"`` with
    :func:`with_self_loops` data for the official ``E + N`` edge mask."""
    return UGSGAT(num_features, num_classes, hidden, heads, dropout, 0.01, clean, self_loops, aggregation,
                  fast_dropout)
