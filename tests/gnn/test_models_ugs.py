"""models/gnn_ugs.py: the UGS paper's GCN, GIN and GAT (ALGORITHMS.md §2.4-2.5).

The fast GCN layout (transform-first, sparse x, sparse-matrix aggregation) must be the official
aggregate-first model up to rounding: outputs and gradients (weights and edge_weight) in float64,
and find_ticket's rounds on it. GIN's mean counts masked edges in its denominator (hand-computed
on 3 nodes); GAT's logit-mask quirk against the clean softmax on a tiny graph."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_geometric")

from torch_geometric.data import Data  # noqa: E402
from torch_geometric.utils import stochastic_blockmodel_graph  # noqa: E402

import structprune as sp  # noqa: E402
from models import gnn_ugs  # noqa: E402
from structprune.gnn.masks import count_macs  # noqa: E402


def graph(n=30, f=12, seed=0, loops=True, dup=True):
    """A random directed graph with sparse features, some self-loops and a duplicated edge."""
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, 5 * n), generator=g)
    if loops:
        ei = torch.cat([ei, torch.tensor([[3, 7], [3, 7]])], 1)
    if dup:
        ei = torch.cat([ei, ei[:, :2]], 1)
    x = torch.rand(n, f, generator=g, dtype=torch.float64) * (torch.rand(n, f, generator=g) < 0.2)
    return x, ei


def outputs_and_grads(model, x, ei, w):
    w = w.clone().requires_grad_(True)
    model.zero_grad()
    out = model(x, ei, w)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), w.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, tol=1e-10):
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    torch.testing.assert_close(a[1], b[1], atol=tol, rtol=tol)
    assert a[2].keys() == b[2].keys()
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], atol=tol, rtol=tol, msg=n)


@pytest.mark.parametrize("degree", ["source", "target"])
@pytest.mark.parametrize("layout", [None, torch.sparse_coo, torch.sparse_csr])
@pytest.mark.parametrize("order,aggregation", [("transform", "messages"), ("transform", "spmm"),
                                               ("aggregate", "spmm")])
def test_fast_gcn_layouts_equal_the_official_one(degree, layout, order, aggregation):
    """Outputs, weight gradients and edge_weight gradients match the aggregate-first dense model
    (float64, asymmetric edge weights, duplicated edges and graph self-loops included)."""
    x, ei = graph()
    torch.manual_seed(0)
    ref = gnn_ugs.build(12, 4, hidden=16, degree=degree).double().eval()
    fast = gnn_ugs.UGSGCN(12, 4, 16, degree=degree, order=order, aggregation=aggregation).double().eval()
    fast.load_state_dict(ref.state_dict())
    w = torch.rand(ei.size(1), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xin = x if layout is None else gnn_ugs.sparse_features(x, layout)
    assert_same(outputs_and_grads(ref, x, ei, w), outputs_and_grads(fast, xin, ei, w))


def test_build_fast_trains_like_the_official_model_up_to_dropout():
    """build_fast = transform + spmm + rand dropout: in eval it equals build(); in training its
    dropout keeps each entry with probability 1 - p, scaled by 1 / (1 - p); the official model's
    training forward still draws F.dropout's masks (same seed, same output)."""
    x, ei = graph(n=200, f=12)
    torch.manual_seed(0)
    ref = gnn_ugs.build(12, 4, hidden=64).double()
    fast = gnn_ugs.build_fast(12, 4, hidden=64).double()
    fast.load_state_dict(ref.state_dict())
    xs = gnn_ugs.sparse_features(x)
    torch.testing.assert_close(fast.eval()(xs, ei), ref.eval()(x, ei), atol=1e-10, rtol=1e-10)
    h = torch.full((400, 50), 3.0, dtype=torch.float64)
    torch.manual_seed(1)
    d = gnn_ugs.dropout(h, 0.5, True, fast=True)
    assert set(d.unique().tolist()) <= {0.0, 6.0} and abs(float((d > 0).double().mean()) - 0.5) < 0.02
    torch.manual_seed(2)
    expect = F.dropout(h, 0.5, True)
    torch.manual_seed(2)
    torch.testing.assert_close(gnn_ugs.dropout(h, 0.5, True), expect)
    assert torch.equal(gnn_ugs.dropout(h, 0.5, False, fast=True), h)


def sbm(seed=0, sizes=(20, 20, 20)):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probs = [[0.3 if i == j else 0.03 for j in range(len(sizes))] for i in range(len(sizes))]
    ei = stochastic_blockmodel_graph(list(sizes), probs)
    n = sum(sizes)
    y = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = F.one_hot(y, 8).double() * (torch.rand(n, 8, generator=g) < 0.7)
    perm = torch.randperm(n, generator=g)
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    for m, part in zip(masks, (perm[:15], perm[15:30], perm[30:])):
        m[part] = True
    return Data(x=x, edge_index=ei, y=y, train_mask=masks[0], val_mask=masks[1], test_mask=masks[2])


def test_find_ticket_on_the_fast_gcn_equals_the_official_one():
    """find_ticket on the transform-first, spmm, sparse-x GCN (F.dropout, float64) gives the same
    kept counts, the same edge and weight masks and the same accuracies as on the official model,
    and its ticket reproduces its last test accuracy."""
    data = sbm()
    fast_data = data.clone()
    fast_data.x = gnn_ugs.sparse_features(data.x)
    torch.manual_seed(0)
    ref = gnn_ugs.build(8, 3, hidden=16).double()
    fast = gnn_ugs.UGSGCN(8, 3, 16, order="transform", aggregation="spmm").double()
    fast.load_state_dict(ref.state_dict())
    kw = dict(rounds=3, epochs=6, lr=0.05, progress=False, seed=0)
    a, b = sp.gnn.find_ticket(ref, data, **kw), sp.gnn.find_ticket(fast, fast_data, **kw)
    for key in ("edges_kept", "weights_kept", "val_acc", "test_acc"):
        assert [h[key] for h in a.history] == [h[key] for h in b.history], key
    assert torch.equal(a.edge_mask, b.edge_mask)
    assert all(torch.equal(a.weight_masks[n], b.weight_masks[n]) for n in a.weight_masks)
    out = b.model(b.data.x, b.data.edge_index)
    acc = float((out[b.data.test_mask].argmax(-1) == b.data.y[b.data.test_mask]).float().mean())
    assert acc == b.history[-1]["test_acc"]


def test_count_macs_sees_the_fast_models_messages():
    """With a hook on the layer (count_macs) the spmm aggregation runs PyG's messages, so the
    fast GCN counts like the transform-first message-passing one: the paper's MAC formula."""
    x, ei = graph(loops=False, dup=False)
    x = x.float()
    torch.manual_seed(0)
    fast = gnn_ugs.build_fast(12, 4, hidden=16)
    msgs = gnn_ugs.UGSGCN(12, 4, 16, order="transform")
    msgs.load_state_dict(fast.state_dict())
    n, e = x.size(0), ei.size(1) + x.size(0)
    paper = 12 * 16 * n + e * 16 + 16 * 4 * n + e * 4  # ALGORITHMS.md §2.8 with dense weights
    assert count_macs(fast, gnn_ugs.sparse_features(x), ei) == count_macs(msgs, x, ei) == paper


def test_bad_options_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="order"):
        gnn_ugs.build(4, 2, order="sideways")
    with pytest.raises(ValueError, match="aggregation"):
        gnn_ugs.UGSGCN(4, 2, aggregation="dense")
    with pytest.raises(ValueError, match="self_loops"):
        gnn_ugs.ugs_gat(4, 2, self_loops="none")
    with pytest.raises(ValueError, match="layout"):
        gnn_ugs.sparse_features(torch.eye(3), torch.sparse_bsr)


# ---------------------------------------------------------------- GIN


def test_gin_mean_counts_masked_edges_in_its_denominator():
    """3 nodes, edges 0->2, 1->2, 2->0, masks 0.5, 0 (pruned), 1: node 2 takes (0.5 h0 + 0 h1) / 2,
    node 0 takes h2 / 1, node 1 nothing. Hand-computed through both layers and the prediction."""
    torch.manual_seed(0)
    model = gnn_ugs.ugs_gin(2, 2, hidden=3).double().eval()
    with torch.no_grad():
        model.eps[0].fill_(0.5)
        model.eps[1].fill_(-0.25)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    ei = torch.tensor([[0, 1, 2], [2, 2, 0]])
    m = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)

    def mean(h):
        return torch.stack([m[2] * h[2] / 1, torch.zeros_like(h[1]), (m[0] * h[0] + m[1] * h[1]) / 2])

    w1, w2 = model.ginlayers[0].weight, model.ginlayers[1].weight
    h1 = ((1.5 * x + mean(x)) @ w1.t()).relu()
    h2 = ((0.75 * h1 + mean(h1)) @ w2.t()).relu()
    expect = (h1 @ model.linears_prediction.weight.t() + h2) / 2
    torch.testing.assert_close(model(x, ei, m), expect)
    # the pruned edge still counts: removing it changes node 2's mean
    assert not torch.allclose(model(x, ei[:, [0, 2]], m[[0, 2]]), expect)


@pytest.mark.parametrize("order,aggregation", [("transform", "messages"), ("transform", "spmm"),
                                               ("aggregate", "spmm")])
def test_gin_fast_layouts_equal_the_official_one(order, aggregation):
    x, ei = graph()
    torch.manual_seed(0)
    ref = gnn_ugs.ugs_gin(12, 4, hidden=16).double().eval()
    fast = gnn_ugs.ugs_gin(12, 4, hidden=16, order=order, aggregation=aggregation).double().eval()
    fast.load_state_dict(ref.state_dict())
    w = torch.rand(ei.size(1), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = outputs_and_grads(ref, x, ei, w)
    assert res[1].abs().sum() > 0  # the mask gets a gradient
    assert_same(res, outputs_and_grads(fast, gnn_ugs.sparse_features(x), ei, w))


def test_gin_shapes_and_official_weight_masks():
    model = gnn_ugs.ugs_gin(1433, 7)
    x, ei = graph(f=1433)
    assert model(x.float(), ei).shape == (30, 7)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {n: shapes[n] for n in model.ugs_weights} == {"ginlayers.0.weight": (512, 1433),
                                                         "ginlayers.1.weight": (7, 512)}
    assert shapes["eps.0"] == shapes["eps.1"] == (1,) and shapes["linears_prediction.weight"] == (7, 512)


# ---------------------------------------------------------------- GAT


def tiny_gat(clean, heads=2):
    torch.manual_seed(0)
    return gnn_ugs.ugs_gat(3, 2, hidden=4, heads=heads, clean=clean).double().eval()


def test_gat_logit_quirk_against_the_clean_softmax():
    """A zero mask on edge 0->1: clean equals the graph without that edge (the edge is gone);
    the quirk gives it logit 0, so node 1 still attends to node 0 (differs from both). With all
    masks 1 the two agree."""
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, 1.0, 0.0]], dtype=torch.float64)
    ei = torch.tensor([[0, 2, 1, 2], [1, 1, 0, 0]])
    m = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    quirk, clean = tiny_gat(False), tiny_gat(True)
    clean.load_state_dict(quirk.state_dict())
    ones = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(quirk(x, ei, ones), clean(x, ei, ones))
    removed = clean(x, ei[:, 1:], m[1:])
    torch.testing.assert_close(clean(x, ei, m), removed)
    assert not torch.allclose(quirk(x, ei, m)[1], removed[1])
    # the quirk by hand for layer 1, head 0 at node 1: softmax over logits (0 * e01, e21, e11 self-loop)
    z = (x @ quirk.fc1.weight.t()).view(3, 2, 4)[:, 0]
    a = quirk.attn1[0]
    e = lambda j, i: F.leaky_relu(z[j] @ a[:4] + z[i] @ a[4:], 0.01)  # noqa: E731
    alpha = torch.softmax(torch.stack([0 * e(0, 1), e(2, 1), e(1, 1)]), 0)
    h1 = alpha[0] * z[0] + alpha[1] * z[2] + alpha[2] * z[1]
    got = {}
    quirk.propagate.register_forward_hook(lambda mod, inp, out: got.setdefault("h", out))
    quirk(x, ei, m)
    torch.testing.assert_close(got["h"][1], h1)


def test_gat_gradient_reaches_edge_weight_and_self_loops_given():
    """The mask gets a gradient in both modes; with self_loops='given' on with_self_loops(data)
    the mask has E + N entries (self-loops masked too) and, all ones, equals self_loops='add'."""
    x, ei = graph(loops=False, dup=False)
    x = x.float()
    data = gnn_ugs.with_self_loops(Data(x=x, edge_index=ei, edge_attr=torch.ones(ei.size(1))))
    assert data.edge_index.size(1) == ei.size(1) + 30 and "edge_attr" not in data
    for clean in (False, True):
        torch.manual_seed(0)
        add = gnn_ugs.ugs_gat(12, 4, hidden=8, heads=2, clean=clean).eval()
        given = gnn_ugs.ugs_gat(12, 4, hidden=8, heads=2, clean=clean, self_loops="given").eval()
        given.load_state_dict(add.state_dict())
        w = torch.ones(data.edge_index.size(1), requires_grad=True)
        out = given(data.x, data.edge_index, w)
        assert out.shape == (30, 4)
        torch.testing.assert_close(out, add(x, ei, torch.ones(ei.size(1))))
        out.square().sum().backward()
        assert w.grad[-30:].abs().sum() > 0 and w.grad[:-30].abs().sum() > 0


def test_gat_spmm_equals_messages_and_official_shapes():
    x, ei = graph()
    for clean in (False, True):
        torch.manual_seed(0)
        ref = gnn_ugs.ugs_gat(12, 4, hidden=8, heads=3, clean=clean).double().eval()
        fast = gnn_ugs.ugs_gat(12, 4, hidden=8, heads=3, clean=clean, aggregation="spmm").double().eval()
        fast.load_state_dict(ref.state_dict())
        w = torch.rand(ei.size(1), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert_same(outputs_and_grads(ref, x, ei, w), outputs_and_grads(fast, gnn_ugs.sparse_features(x), ei, w))
    shapes = {n: tuple(p.shape) for n, p in gnn_ugs.ugs_gat(1433, 7).named_parameters()}
    assert shapes == {"fc1.weight": (4096, 1433), "attn1": (8, 1024), "fc2.weight": (7, 4096), "attn2": (1, 14)}


@pytest.mark.parametrize("make", [lambda: gnn_ugs.ugs_gin(12, 4, hidden=8),
                                  lambda: gnn_ugs.ugs_gat(12, 4, hidden=8, heads=2)])
def test_full_graph_runs_a_pruned_graph_as_the_official_binary_mask(make):
    """After set_full_graph(E), a subset of E (a ticket's graph) runs as E with the missing edges
    masked to 0: the official fixed-mask stage for GIN's denominator and GAT's logit quirk, where
    removing the edges would differ. An edge outside E and a graph with duplicates are refused."""
    x, ei = graph(loops=False, dup=False)
    ei = torch.unique(ei, dim=1)
    x = x.float()
    torch.manual_seed(0)
    model = make().eval()
    keep = torch.rand(ei.size(1), generator=torch.Generator().manual_seed(3)) > 0.3
    removed = model(x, ei[:, keep])
    model.set_full_graph(ei)
    masked = model(x, ei, keep.float())
    torch.testing.assert_close(model(x, ei[:, keep]), masked)
    assert not torch.allclose(removed, masked)
    w = torch.rand(int(keep.sum()), requires_grad=True)
    model(x, ei[:, keep], w).sum().backward()
    assert w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="set_full_graph"):
        model(x, torch.tensor([[0, 1], [0, 1]]) if not bool(((ei[0] == 0) & (ei[1] == 0)).any()) else ei.flip(0))
    with pytest.raises(ValueError, match="duplicate"):
        model.set_full_graph(torch.cat([ei, ei[:, :1]], 1))
