"""Graph nodes and edges as prunable units: ``sp.gnn.prune`` and ``structprune.graph.units``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import models
import structprune as sp
from structprune.graph.units import graph_units
from structprune.plan import count_params
from structprune.rules import Space
from structprune.testing import assert_graph_oracle

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.data import Data  # noqa: E402
from torch_geometric.nn import GCNConv, SAGEConv  # noqa: E402
from torch_geometric.utils import to_undirected  # noqa: E402


def _data(arch: str = "gcn", seed: int = 0) -> Data:
    torch.manual_seed(seed)
    args = models.example_inputs(arch)
    data = Data(**dict(zip(["x", "edge_index", "batch"], args)))
    data.y = torch.randint(0, 3, (data.num_nodes,))
    data.train_mask = torch.rand(data.num_nodes) < 0.5
    data.edge_attr = torch.randn(data.edge_index.size(1), 2)  # not read by the model: sliced
    return data


def _model(arch: str) -> nn.Module:
    torch.manual_seed(1)
    return models.get(arch).eval()


@pytest.mark.parametrize("arch", ["gcn", "gat", "graphsage", "gin"])
def test_edges_nodes_and_channels_exact(arch):
    model, data = _model(arch), _data(arch)
    state = copy.deepcopy(model.state_dict())
    res = sp.gnn.prune(model, data, ratio=0.5, edge_ratio=0.3, node_ratio=0.2)
    pruned, pdata = res
    n, e = data.num_nodes, data.edge_index.size(1)
    assert res.node_mask.dtype == torch.bool and res.node_mask.numel() == n
    assert res.edge_mask.dtype == torch.bool and res.edge_mask.numel() == e
    assert pdata.num_nodes == int(res.node_mask.sum()) == n - round(0.2 * n)
    assert pdata.edge_index.size(1) == int(res.edge_mask.sum()) <= e - round(0.3 * e)
    # every attribute kept, sliced per node / per edge, edge_index re-indexed onto kept nodes
    assert torch.equal(pdata.y, data.y[res.node_mask])
    assert torch.equal(pdata.train_mask, data.train_mask[res.node_mask])
    assert torch.equal(pdata.edge_attr, data.edge_attr[res.edge_mask])
    assert int(pdata.edge_index.max()) < pdata.num_nodes
    new_id = torch.cumsum(res.node_mask.long(), 0) - 1
    assert torch.equal(pdata.edge_index, new_id[data.edge_index[:, res.edge_mask]])
    # no edge of a dropped node survives
    dropped = ~res.node_mask
    assert not (res.edge_mask & (dropped[data.edge_index[0]] | dropped[data.edge_index[1]])).any()
    assert count_params(pruned) < count_params(model)
    assert_graph_oracle(model, data, res, tol=1e-5)
    # the input model and data are unchanged
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert data.edge_index.size(1) == e and data.num_nodes == n
    assert res.plan.activation_masks()


def _gcn_dense(model: nn.Module, x: torch.Tensor, ei: torch.Tensor) -> torch.Tensor:
    """A hand-built reference for models/gnn.py's 2-layer GCN in eval mode: dense
    ``D^-1/2 (A + I) D^-1/2 X W + b`` per layer, ReLU between."""
    n = x.size(0)
    a = torch.zeros(n, n)
    a[ei[1], ei[0]] = 1.0  # messages flow source -> target
    a = a + torch.eye(n)
    d = a.sum(1).pow(-0.5)
    norm = d[:, None] * a * d[None, :]
    convs = [m for m in model.modules() if isinstance(m, GCNConv)]
    h = x
    for i, conv in enumerate(convs):
        h = norm @ (h @ conv.lin.weight.T) + conv.bias
        if i < len(convs) - 1:
            h = h.relu()
    return h


def test_hand_built_reference_gcn():
    model, data = _model("gcn"), _data("gcn", seed=3)
    res = sp.gnn.prune(model, data, edge_ratio=0.25, node_ratio=0.25, graph_importance="random")
    pruned, pdata = res
    with torch.no_grad():
        got = pruned(pdata.x, pdata.edge_index)
        want = _gcn_dense(model, pdata.x, pdata.edge_index)
        # and the same thing seen from the original graph: kept rows, dropped edges excluded
        full = _gcn_dense(model, data.x, data.edge_index[:, res.edge_mask])[res.node_mask]
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got, full, atol=1e-5)


def test_undirected_drops_both_directions_and_scores_follow():
    model = _model("gcn")
    data = _data("gcn", seed=5)
    res = sp.gnn.prune(model, data, edge_ratio=0.4, undirected=True)
    pairs = {}
    for k, (i, j) in enumerate(data.edge_index.t().tolist()):
        pairs.setdefault((min(i, j), max(i, j)), []).append(bool(res.edge_mask[k]))
    assert all(len(set(v)) == 1 for v in pairs.values())
    assert (~res.edge_mask).sum() >= round(0.4 * data.edge_index.size(1))
    # user scores: the lowest go first
    scores = torch.arange(data.edge_index.size(1), dtype=torch.float)
    res = sp.gnn.prune(model, data, edge_ratio=0.5, graph_importance=scores)
    k = round(0.5 * data.edge_index.size(1))
    assert not res.edge_mask[:k].any() and res.edge_mask[k:].all()


def test_directed_edges_are_their_own_units():
    model, data = _model("gcn"), _data("gcn", seed=2)
    data.edge_index = to_undirected(data.edge_index)
    scores = torch.rand(data.edge_index.size(1), generator=torch.Generator().manual_seed(0))
    res = sp.gnn.prune(model, data, edge_ratio=0.3, graph_importance=scores)
    kept = {tuple(p) for p in data.edge_index[:, res.edge_mask].t().tolist()}
    assert any((j, i) not in kept for i, j in kept)  # some reverse edges went alone


def test_taylor_scores_need_the_mask_to_reach_the_output():
    class NoEdges(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 3)

        def forward(self, x, edge_index):
            return self.lin(x)

    with pytest.raises(sp.ModelError, match="MessagePassing layer.*'degree'"):
        sp.gnn.prune(NoEdges(), _data(), edge_ratio=0.3)


class PlainMessagePassing(nn.Module):
    """Message passing written in plain torch (captured by fx, not export)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x, edge_index):
        h = self.l1(x).relu()
        out = torch.zeros_like(h).index_add_(0, edge_index[1], h[edge_index[0]])
        return self.l2(out + h)


def test_plain_torch_message_passing():
    model, data = PlainMessagePassing(), _data()
    assert sp.trace(model, (data.x, data.edge_index)).graph_module.meta.get(
        "structprune_capture") != "export"
    res = sp.gnn.prune(model, data, ratio=0.5, edge_ratio=0.3, node_ratio=0.3,
                       graph_importance="degree")
    assert res.data.num_nodes < data.num_nodes and res.model.l1.out_features == 6
    assert_graph_oracle(model, data, res)


class MeanCentred(nn.Module):
    """Subtracts the mean over all nodes: a kept node's output depends on every other node."""

    def __init__(self):
        super().__init__()
        self.conv = SAGEConv(16, 8)

    def forward(self, x, edge_index):
        h = self.conv(x, edge_index)
        return h - h.mean(0, keepdim=True)


class PerNode(nn.Module):
    """A learned vector per node (transductive embedding) added to the features."""

    def __init__(self, n: int):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(n, 16))
        self.conv = SAGEConv(16, 8)

    def forward(self, x, edge_index):
        return self.conv(x + self.emb, edge_index)


class CountNormalised(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = SAGEConv(16, 8)

    def forward(self, x, edge_index):
        return self.conv(x, edge_index) / x.size(0)


def test_node_units_refused_with_the_op_named():
    data = _data()
    with pytest.raises(sp.PlanError, match="mean"):
        sp.gnn.prune(MeanCentred(), data, node_ratio=0.2)
    with pytest.raises(sp.PlanError, match="size of dim 0 of %x"):
        sp.gnn.prune(CountNormalised(), data, node_ratio=0.2)
    with pytest.raises(sp.PlanError, match="emb"):
        sp.gnn.prune(PerNode(data.num_nodes), data, node_ratio=0.2)
    # edges stay exact for all three
    for m in (MeanCentred(), CountNormalised(), PerNode(data.num_nodes)):
        res = sp.gnn.prune(m, data, edge_ratio=0.3)
        assert_graph_oracle(m, data, res)


def test_graph_units_relation():
    data = _data()
    dg = sp.trace(_model("gcn"), (data.x, data.edge_index))
    units = graph_units(dg, {"x": 0}, {"edge_index": 1})
    assert units.nodes_exact and units.edges_exact and not units.node_params
    dg = sp.trace(PerNode(data.num_nodes), (data.x, data.edge_index))
    units = graph_units(dg, {"x": 0}, {"edge_index": 1})
    assert [str(p) for p in units.node_params] == ["@emb[0]"]
    with pytest.raises(KeyError, match="batch"):
        graph_units(dg, {"batch": 0}, {})


def test_channel_pruning_unchanged_by_graph_records():
    """Index-addressed rows stay frozen for channels (an Address is a Freeze)."""
    data = _data()
    dg = sp.trace(_model("gcn"), (data.x, data.edge_index))
    assert dg.is_frozen(Space.model_input("x", 0))
    assert [g.num_units for g in dg.groups()] == [16]


def test_bad_arguments():
    model, data = _model("gcn"), _data()
    with pytest.raises(ValueError, match="edge_ratio"):
        sp.gnn.prune(model, data, edge_ratio=1.0)
    with pytest.raises(ValueError, match="scores have 3 entries"):
        sp.gnn.prune(model, data, edge_ratio=0.2, graph_importance=torch.ones(3))
    with pytest.raises(ValueError, match="graph_importance"):
        sp.gnn.prune(model, data, edge_ratio=0.2, graph_importance="pagerank")
    with pytest.raises(TypeError, match="Data"):
        sp.gnn.prune(model, {"x": data.x}, edge_ratio=0.2)
    with pytest.raises(sp.NothingPrunedWarning):
        sp.gnn.prune(model, data, edge_ratio=0.001)


def test_positional_inputs_and_other_graph_sizes():
    model = _model("gat")
    data = _data("gat")
    pruned, pdata = sp.gnn.prune(model, (data.x, data.edge_index), ratio=0.5, edge_ratio=0.2)
    assert pdata.edge_index.size(1) < data.edge_index.size(1)
    other = _data("gat", seed=11)
    with torch.no_grad():
        assert pruned(other.x, other.edge_index).shape[0] == other.num_nodes


def test_graph_classification_nodes_and_batch():
    model, data = _model("gin_graph"), _data("gin_graph")
    graphs = int(data.batch.max()) + 1
    res = sp.gnn.prune(model, data, ratio=0.5, edge_ratio=0.2, node_ratio=0.2,
                       graph_importance="random")
    assert torch.equal(res.data.batch, data.batch[res.node_mask])
    with torch.no_grad():
        out = res.model(*res.inputs)
    assert out.shape[0] == int(res.data.batch.max()) + 1 <= graphs
    assert_graph_oracle(model, data, res)


def test_taylor_falls_back_to_messages_when_edge_weight_is_ignored():
    """PyG's ``GIN`` takes ``edge_weight`` but its convolutions ignore it: the edge scores come
    from the explain hooks instead of a refusal."""
    from torch_geometric.nn.models import GIN

    torch.manual_seed(0)
    model = GIN(16, 16, num_layers=2, out_channels=3).eval()
    data = _data()
    res = sp.gnn.prune(model, data, edge_ratio=0.3, undirected=True)
    assert int((~res.edge_mask).sum()) >= round(0.3 * data.edge_index.size(1))
    assert_graph_oracle(model, data, res)
