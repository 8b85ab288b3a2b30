"""The GNN reference models (models/gnn*.py) and the offline Planetoid loader (models/planetoid.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_geometric.nn import GATConv, GATv2Conv, GINConv, SAGEConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

import models
from models import planetoid
from models.gnn_ugs import ugs_norm

GRAPH_MODELS = ["gcn", "graphsage", "gin", "gat", "gatv2", "gin_graph", "ugs_gcn"]
REPO = Path(__file__).resolve().parents[2]


def _run(name: str, inputs: tuple[torch.Tensor, ...], **cfg) -> tuple[nn.Module, torch.Tensor]:
    model = models.get(name, **cfg).double().eval()
    with torch.no_grad():
        return model, model(*(t.double() if t.is_floating_point() else t for t in inputs))


def test_registry_lists_graph_models_only_when_asked() -> None:
    assert models.names(kind="graph") == GRAPH_MODELS
    image = models.names()
    assert not set(image) & set(GRAPH_MODELS), "graph models leaked into the default names()"
    assert set(models.names(include_large=True)) & set(GRAPH_MODELS) == set()
    assert set(models.names(kind="all")) == set(image) | set(GRAPH_MODELS)
    assert all(models.is_graph(n) for n in GRAPH_MODELS)
    assert not any(models.is_graph(n) for n in models.names(include_large=True))
    with pytest.raises(ValueError, match="unknown model kind 'vision'"):
        models.names(kind="vision")


def test_listing_models_does_not_import_torch_geometric() -> None:
    code = (
        "import sys, models; models.names(kind='all'); models.is_graph('gcn'); "
        "assert 'torch_geometric' not in sys.modules, 'torch_geometric imported by the registry'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_graph_model_runs_on_example_and_other_sized_graphs(name: str) -> None:
    inputs = models.example_inputs(name)
    x, edge_index = inputs[0], inputs[1]
    assert x.shape[1] == 16 and edge_index.dtype == torch.long and edge_index.shape[0] == 2
    assert (edge_index[0] != edge_index[1]).all(), "example graph has self loops"
    _, out = _run(name, inputs, num_classes=5)
    rows = int(inputs[2].max()) + 1 if name == "gin_graph" else x.shape[0]
    assert out.shape == (rows, 5) and out.dtype == torch.float64
    assert torch.isfinite(out).all()

    other = models.example_inputs(name, batch=2, num_features=9, num_nodes=41)
    assert other[0].shape == (82, 9)
    _, out = _run(name, other, num_features=9, num_classes=3, hidden=12)
    assert out.shape == ((2, 3) if name == "gin_graph" else (82, 3))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_disjoint_graphs_do_not_interact(name: str) -> None:
    """A batch of graphs (disjoint union) gives each graph the output it gets alone: the batch
    vector and the node offsets of the merged edge_index are right."""
    torch.manual_seed(1)
    parts = [models.example_inputs(name, batch=1) for _ in range(3)]
    model = models.get(name, num_classes=4).double().eval()
    x = torch.cat([p[0] for p in parts]).double()
    offsets = torch.tensor([0] + [p[0].shape[0] for p in parts]).cumsum(0)
    edge_index = torch.cat([p[1] + o for p, o in zip(parts, offsets)], dim=1)
    owners = torch.cat([torch.full((p[0].shape[0],), g) for g, p in enumerate(parts)])
    extra = (owners,) if name == "gin_graph" else ()
    with torch.no_grad():
        merged = model(x, edge_index, *extra)
        alone = torch.cat([model(*(t.double() if t.is_floating_point() else t for t in p)) for p in parts])
    torch.testing.assert_close(merged, alone)


def test_node_models_follow_the_papers_layouts() -> None:
    gat = models.get("gat", num_features=20, num_classes=3)
    assert isinstance(gat.conv1, GATConv) and isinstance(gat.conv2, GATConv)
    assert (gat.conv1.heads, gat.conv1.out_channels, gat.conv1.concat, gat.conv1.dropout) == (8, 8, True, 0.6)
    conv2 = gat.conv2
    assert (conv2.in_channels, conv2.heads, conv2.concat, conv2.dropout) == (64, 1, False, 0.6)
    gatv2 = models.get("gatv2")
    assert isinstance(gatv2.conv1, GATv2Conv) and gatv2.conv1.heads == 8 and gatv2.conv2.concat is False
    sage = models.get("graphsage")
    assert isinstance(sage.conv1, SAGEConv) and sage.conv1.aggr == "mean"
    assert models.get("gcn").conv1.out_channels == 16
    for conv in (models.get("gin").conv1, *models.get("gin_graph").convs):
        assert isinstance(conv, GINConv)
        assert [type(m) for m in conv.nn] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert len(models.get("gin_graph").convs) == 3
    ugs = models.get("ugs_gcn", num_features=1433, num_classes=7)
    shapes = [(linear.in_features, linear.out_features, linear.bias) for linear in ugs.layers]
    assert shapes == [(1433, 512, None), (512, 7, None)]
    with pytest.raises(ValueError, match="unknown GNN arch 'gcnn'"):
        models.gnn.build("gcnn")


def test_gin_graph_pooling_modes_differ() -> None:
    x, edge_index, batch = models.example_inputs("gin_graph")
    torch.manual_seed(0)
    add = models.get("gin_graph", pool="add").eval()
    torch.manual_seed(0)
    mean = models.get("gin_graph", pool="mean").eval()
    with torch.no_grad():
        assert not torch.allclose(add(x, edge_index, batch), mean(x, edge_index, batch))
    with pytest.raises(ValueError, match="pool must be one of"):
        models.get("gin_graph", pool="max")


def _ugs_dense_reference(model, x, edge_index, edge_weight):
    """The official net_gcn forward (eval): dense adj with the mask applied, A' = adj + I,
    Â = (A' D).T @ D with D from row sums; per layer x = Linear(Â @ x)."""
    n = x.shape[0]
    adj = torch.zeros(n, n, dtype=x.dtype)
    adj.index_put_((edge_index[0], edge_index[1]), edge_weight, accumulate=True)
    adj = adj + torch.eye(n, dtype=x.dtype)
    d = adj.sum(1).pow(-0.5)
    d[torch.isinf(d)] = 0.0
    a_hat = (adj @ torch.diag(d)).t() @ torch.diag(d)
    for i, linear in enumerate(model.layers):
        x = linear(a_hat @ x)
        if i < len(model.layers) - 1:
            x = x.relu()
    return x


def test_ugs_gcn_matches_the_official_dense_forward_with_an_asymmetric_mask() -> None:
    x, edge_index = models.example_inputs("ugs_gcn", num_features=6)
    x = x.double()
    # an asymmetric mask with some pruned (zero) entries and one raw self loop (weight 2, as on CiteSeer)
    edge_index = torch.cat([edge_index, torch.tensor([[3], [3]])], dim=1)
    mask = torch.rand(edge_index.shape[1], dtype=torch.float64) * (torch.rand(edge_index.shape[1]) > 0.3)
    model = models.get("ugs_gcn", num_features=6, num_classes=3, hidden=8).double().eval()
    with torch.no_grad():
        out = model(x, edge_index, mask)
        torch.testing.assert_close(out, _ugs_dense_reference(model, x, edge_index, mask))
        # degree="target" is PyG's gcn_norm convention, different for an asymmetric mask
        target = models.get("ugs_gcn", num_features=6, num_classes=3, hidden=8, degree="target")
        target = target.double().eval()
        target.load_state_dict(model.state_dict())
        assert not torch.allclose(target(x, edge_index, mask), out)
    no_loop = edge_index[0] != edge_index[1]
    ei, w = ugs_norm(edge_index[:, no_loop], mask[no_loop], x.shape[0], degree="target")
    ei_pyg, w_pyg = gcn_norm(edge_index[:, no_loop], mask[no_loop], x.shape[0], add_self_loops=True)
    assert torch.equal(ei, ei_pyg)
    torch.testing.assert_close(w, w_pyg)


def test_ugs_gcn_without_edge_weight_is_the_unit_mask() -> None:
    x, edge_index = models.example_inputs("ugs_gcn")
    model = models.get("ugs_gcn", hidden=8).eval()
    with torch.no_grad():
        ones = torch.ones(edge_index.shape[1])
        torch.testing.assert_close(model(x, edge_index), model(x, edge_index, ones))
    with pytest.raises(ValueError, match="degree must be one of"):
        models.get("ugs_gcn", degree="row")


def test_planetoid_loads_offline_with_the_public_split() -> None:
    cora = planetoid.load("cora")
    assert (cora.num_nodes, cora.num_features, cora.edge_index.shape[1]) == (2708, 1433, 10556)
    assert int(cora.y.max()) + 1 == 7
    assert [int(m.sum()) for m in (cora.train_mask, cora.val_mask, cora.test_mask)] == [140, 500, 1000]
    torch.testing.assert_close(cora.x.sum(1), torch.ones(2708))  # NormalizeFeatures
    raw = planetoid.load("Cora", normalize=False)
    assert set(raw.x.unique().tolist()) == {0.0, 1.0}
    citeseer = planetoid.load("CiteSeer", root="../shared/data/planetoid")
    assert (citeseer.num_nodes, citeseer.num_features, int(citeseer.train_mask.sum())) == (3327, 3703, 120)
    assert not (Path(planetoid.raw_dir("Cora")).parent / "processed").exists(), "wrote into the shared folder"


def test_planetoid_missing_data_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no raw data folder {tmp_path}/Cora/raw"):
        planetoid.load("Cora", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing raw file.*ind.pubmed.allx in .*PubMed/raw"):
        planetoid.load("PubMed")
    with pytest.raises(ValueError, match="unknown Planetoid dataset 'Reddit'"):
        planetoid.load("Reddit")


def test_gcn_learns_cora() -> None:
    """Kipf & Welling's setup (Adam lr 0.01, weight decay 5e-4 on the first layer), 100 epochs;
    the data README measures 81.6% test accuracy at 200 epochs."""
    data = planetoid.load("Cora")
    model = models.get("gcn", num_features=data.num_features, num_classes=7)
    optimizer = torch.optim.Adam(
        [
            {"params": model.conv1.parameters(), "weight_decay": 5e-4},
            {"params": model.conv2.parameters(), "weight_decay": 0.0},
        ],
        lr=0.01,
    )
    for _ in range(100):
        model.train()
        optimizer.zero_grad()
        out = model(data.x, data.edge_index)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model(data.x, data.edge_index).argmax(1)
    accuracy = (pred[data.test_mask] == data.y[data.test_mask]).float().mean().item()
    assert accuracy > 0.75, f"GCN on Cora reached {accuracy:.3f} test accuracy"
