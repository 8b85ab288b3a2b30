"""PyTorch Geometric models pruned through the general gather/scatter rules.

Nothing here is registered per layer: each model is captured by ``torch.export`` with its node
and edge counts left open, and ``ops/scatter.py`` couples the channels through the gathers and
scatters that message passing is made of. Every case checks the oracle (pruned == original
with the removed channels zeroed, float64), zero-ratio identity, and that the pruned model runs
on a graph of another size exactly as the masked original does.
"""
import os
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import (GATConv, GATv2Conv, GatedGraphConv, GCNConv, GINConv,  # noqa: E402
                                GraphConv, GraphNorm, MessagePassing, MFConv, SAGEConv,
                                global_add_pool, global_mean_pool)

import structprune as sp  # noqa: E402
from structprune.oracle import masked_output, max_rel_diff, run  # noqa: E402
from structprune.testing import assert_oracle, assert_zero_ratio_identity, randomize_  # noqa: E402


def graph(n, e, f=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=torch.float64)
    return x, torch.randint(0, n, (2, e), generator=g)


class Two(nn.Module):
    """``conv(8 -> 16·heads) -> relu -> conv(-> 4)``: the hidden channels are prunable."""

    def __init__(self, make):
        super().__init__()
        self.c1, self.c2 = make(8, 16), make(None, 4)

    def forward(self, x, edge_index):
        return self.c2(F.relu(self.c1(x, edge_index)), edge_index)


def _two(conv, **kw):
    heads = kw.get("heads", 1) if kw.get("concat", True) else 1

    def make(i, o):
        if i is None:
            return conv(16 * heads, o, **{**kw, "heads": 1} if "heads" in kw else kw)
        return conv(i, o, **kw)
    return Two(make)


def _mlp(i, o):
    return nn.Sequential(nn.Linear(i, o), nn.ReLU(), nn.Linear(o, o))


CONVS = {
    "GCNConv": lambda: _two(GCNConv),
    "SAGEConv_mean": lambda: _two(SAGEConv),
    "SAGEConv_max": lambda: _two(SAGEConv, aggr="max"),
    # PyG Aggregation modules: several at once (concatenated), learnable softmax / power mean
    "SAGEConv_multi_aggr": lambda: _two(SAGEConv, aggr=["mean", "max", "std"]),
    "SAGEConv_softmax_aggr": lambda: _two(SAGEConv, aggr="softmax"),
    "SAGEConv_powermean_aggr": lambda: _two(SAGEConv, aggr="powermean"),
    "GraphConv": lambda: _two(GraphConv),
    "GINConv": lambda: Two(lambda i, o: GINConv(_mlp(16 if i is None else i, o))),
    "GATConv_concat": lambda: _two(GATConv, heads=2),
    "GATConv_mean": lambda: _two(GATConv, heads=2, concat=False),
    "GATv2Conv": lambda: _two(GATv2Conv, heads=2),
    # per-degree weights: zeros(N, device=...) + scatter_add_ + nonzero; the shape pass must
    # keep such factories on the meta device, or the degrees come out all zero there
    "MFConv": lambda: _two(MFConv),
    "GatedGraphConv": lambda: Two(lambda i, o: GatedGraphConv(16 if i is None else 16, 2)),
}


def _check_pruned(model, inputs, others, ratio=0.5):
    pruner = sp.Pruner(model, inputs, ratio=ratio)
    plan = pruner.plan()
    assert not plan.is_empty, f"nothing pruned; frozen: {pruner.graph.frozen()[:5]}"
    pruned = assert_oracle(pruner, plan, tol=1e-9)
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < before
    # On graphs of other sizes the pruned model equals the masked original run on them.
    for other in others:  # the captured graph computes any graph size: the same oracle
        assert max_rel_diff(run(pruned, other), masked_output(pruner.graph, plan, other)) < 1e-9
    return pruned


@pytest.mark.parametrize("name", list(CONVS))
def test_pyg_conv_prunes_exactly_on_any_graph(name):
    torch.manual_seed(0)
    model = randomize_(CONVS[name]()).double().eval()
    inputs = graph(10, 30)
    assert_zero_ratio_identity(model, inputs)
    _check_pruned(model, inputs, [graph(23, 71, seed=1), graph(3, 2, seed=2)])


class GatedConv(MessagePassing):
    """A user's own layer: messages from both ends through linears and a sigmoid gate."""

    def __init__(self, i, o, aggr):
        super().__init__(aggr=aggr)
        self.lin_src, self.lin_dst = nn.Linear(i, o), nn.Linear(i, o, bias=False)
        self.gate = nn.Linear(2 * i, o)
        self.root = nn.Linear(i, o)

    def forward(self, x, edge_index):
        return self.propagate(edge_index, x=x) + self.root(x)

    def message(self, x_i, x_j):
        g = torch.sigmoid(self.gate(torch.cat([x_i, x_j], dim=-1)))
        return g * self.lin_src(x_j) - 0.5 * self.lin_dst(x_i)


class EdgeScaled(MessagePassing):
    """Another: a scalar weight per edge from the distance of the endpoints, then an update."""

    def __init__(self, i, o, aggr):
        super().__init__(aggr=aggr)
        self.lin = nn.Linear(i, o)
        self.upd = nn.Linear(o, o)

    def forward(self, x, edge_index):
        return self.propagate(edge_index, x=self.lin(x))

    def message(self, x_i, x_j):
        w = torch.exp(-(x_i - x_j).pow(2).sum(-1, keepdim=True))
        return w * x_j

    def update(self, aggr_out):
        return F.elu(self.upd(aggr_out))


class Own(nn.Module):
    def __init__(self, aggr):
        super().__init__()
        self.a, self.b = GatedConv(8, 12, aggr), EdgeScaled(12, 10, aggr)
        self.out = nn.Linear(10, 3)

    def forward(self, x, edge_index):
        return self.out(self.b(F.relu(self.a(x, edge_index)), edge_index))


@pytest.mark.parametrize("aggr", ["mean", "max", "add"])
def test_a_users_own_message_passing_layers_prune_with_no_rule_added(aggr):
    torch.manual_seed(0)
    model = randomize_(Own(aggr)).double().eval()
    inputs = graph(11, 40)
    assert_zero_ratio_identity(model, inputs)
    pruned = _check_pruned(model, inputs, [graph(30, 90, seed=3)])
    assert pruned.get_submodule("a.lin_src").weight.shape[0] < 12
    # The distance sums over EdgeScaled's channels: exact with them removed, so they prune.
    assert pruned.get_submodule("b.lin").weight.shape[0] < 10


class GraphClassifier(nn.Module):
    """Graph classification: GraphNorm and pooling read ``int(batch.max()) + 1``."""

    def __init__(self, pool):
        super().__init__()
        self.c1, self.n1 = GCNConv(8, 16), GraphNorm(16)
        self.c2 = GINConv(_mlp(16, 16))
        self.head = nn.Linear(16, 3)
        self.pool = pool

    def forward(self, x, edge_index, batch):
        h = F.relu(self.n1(self.c1(x, edge_index), batch))
        return self.head(self.pool(self.c2(h, edge_index), batch))


def batched(sizes, seed=0):
    xs, eis, bs, off = [], [], [], 0
    for k, n in enumerate(sizes):
        x, ei = graph(n, 3 * n, seed=seed + k)
        xs.append(x), eis.append(ei + off), bs.append(torch.full((n,), k))
        off += n
    return torch.cat(xs), torch.cat(eis, 1), torch.cat(bs)


@pytest.mark.parametrize("pool", [global_add_pool, global_mean_pool], ids=["add", "mean"])
def test_graph_classification_with_a_batch_vector_runs_on_any_number_of_graphs(pool):
    torch.manual_seed(0)
    model = randomize_(GraphClassifier(pool)).double().eval()
    inputs = batched([5, 7])
    pruned = _check_pruned(model, inputs, [batched([4, 9, 6], seed=5)])
    assert pruned(*batched([4, 9, 6], seed=5)).shape == (3, 3)


def test_pruned_gnn_exports_to_onnx_with_open_node_and_edge_counts():
    torch.manual_seed(0)
    model = randomize_(GraphClassifier(global_add_pool)).eval()
    inputs = tuple(t.float() if t.is_floating_point() else t for t in batched([5, 7]))
    other = tuple(t.float() if t.is_floating_point() else t for t in batched([4, 9, 6], seed=5))
    pruned = sp.prune(model, inputs, ratio=0.5)
    with tempfile.TemporaryDirectory() as d:
        res = sp.export_onnx(pruned, inputs, os.path.join(d, "m.onnx"), check_inputs=[other])
        import onnx

        dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in onnx.load(os.path.join(d, "m.onnx")).graph.input]
    assert res.max_abs_diff < 1e-4
    assert isinstance(dims[0][0], str) and dims[0][1] == 8  # nodes open, features fixed
    assert dims[1][0] == 2 and isinstance(dims[1][1], str)  # edges open
    assert dims[2][0] == dims[0][0]  # batch has one entry per node


def test_a_pruned_gnn_refuses_inputs_it_cannot_compute_with_a_clear_error():
    torch.manual_seed(0)
    model = randomize_(CONVS["GCNConv"]()).double().eval()
    pruned = sp.prune(model, graph(10, 30), ratio=0.5)
    with pytest.raises(AssertionError, match="input 'x' with size 8 in dim 1"):
        pruned(*graph(10, 30, f=5))


@pytest.mark.parametrize("conv", [GATConv, GATv2Conv])
@pytest.mark.parametrize("concat", [True, False])
def test_gat_prunes_whole_heads_or_the_channels_inside_every_head(conv, concat):
    """Heads by default (``head_ratio`` sees them: the ``[N, H*D] -> [N, H, D]`` view), the
    same channels of every head with ``head_channels=True``; exact either way."""
    torch.manual_seed(0)
    heads, hid = 4, 6
    model = randomize_(Two(lambda i, o: conv(i, hid, heads=heads, concat=concat) if i else
                           conv(hid * heads if concat else hid, o))).double().eval()
    inputs, other = graph(10, 30), graph(19, 50, seed=4)
    pruner = sp.Pruner(model, inputs, ratio=0.0, head_ratio=0.5)
    if concat:  # concat=False averages the heads: a mean over them keeps every head
        assert pruner.graph.head_groups()
        pruned = assert_oracle(pruner, tol=1e-9)
        assert _c1_widths(pruned) == {hid * heads // 2}
    pruner = sp.Pruner(model, inputs, ratio=0.5, head_channels=True)
    plan = pruner.plan()
    pruned = assert_oracle(pruner, plan, tol=1e-9)
    assert _c1_widths(pruned) == {heads * hid // 2}  # 3 channels left in all 4 heads
    assert max_rel_diff(run(pruned, other), masked_output(pruner.graph, plan, other)) < 1e-9


def _c1_widths(model):
    """The output widths of the first GAT layer's linears (``lin``, or ``lin_l``/``lin_r``)."""
    return {p.shape[0] for n, p in model.named_parameters()
            if n.startswith("c1.lin") and n.endswith("weight")}


def test_a_graph_mode_layer_norm_is_frozen_with_its_reason():
    """PyG's LayerNorm in graph mode without a batch divides by ``x.std(unbiased=False)`` over
    every entry (``aten.std.default(x, False)``, whose second argument is no dim): its channels
    are frozen with the reason, the convolution before it is not refused."""
    from torch_geometric.nn import LayerNorm

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = GCNConv(8, 8), LayerNorm(8, mode="graph")
            self.head = nn.Linear(8, 2)

        def forward(self, x, edge_index):
            return self.head(self.norm(self.conv(x, edge_index)))

    graph_ = sp.trace(randomize_(M()).double().eval(), graph(6, 12))
    assert any("std mixes the entries" in e.reason for e in graph_.frozen())


def test_a_lazy_pyg_linear_is_refused_until_initialised_naming_the_layer():
    from torch_geometric.nn import Linear as PygLinear

    from structprune.errors import ModelError

    class Lazy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = PygLinear(-1, 16), GCNConv(16, 4)

        def forward(self, x, edge_index):
            return self.conv(F.relu(self.lin(x)), edge_index)

    model, inputs = Lazy(), tuple(t.float() if t.is_floating_point() else t for t in graph(9, 20))
    with pytest.raises(ModelError, match=r"module 'lin' \(Linear\) has an uninitialised lazy"):
        sp.prune(model, inputs, ratio=0.5)
    model(*inputs)  # initialised: now it prunes
    assert sp.prune(model, inputs, ratio=0.5).lin.weight.shape[0] == 8


def _hetero_graph(n_paper, n_author, n_edges, seed):
    g = torch.Generator().manual_seed(seed)
    x = {"paper": torch.randn(n_paper, 5, generator=g, dtype=torch.float64),
         "author": torch.randn(n_author, 3, generator=g, dtype=torch.float64)}

    def edges(a, b):
        return torch.stack([torch.randint(0, a, (n_edges,), generator=g),
                            torch.randint(0, b, (n_edges,), generator=g)])
    return x, {("author", "writes", "paper"): edges(n_author, n_paper),
               ("paper", "rev_writes", "author"): edges(n_paper, n_author)}


def test_a_to_hetero_model_prunes_every_edge_type_together():
    """``to_hetero`` copies a layer per edge type and sums them per node type; the copies'
    channels are coupled through the sums, and the dict it returns comes back as a dict."""
    from torch_geometric.nn import to_hetero

    class Homo(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = SAGEConv((-1, -1), 16), SAGEConv((-1, -1), 4)

        def forward(self, x, edge_index):
            return self.c2(F.relu(self.c1(x, edge_index)), edge_index)

    meta = (["paper", "author"], [("author", "writes", "paper"), ("paper", "rev_writes", "author")])
    model = to_hetero(Homo(), meta, aggr="sum")
    inputs = _hetero_graph(7, 4, 10, seed=0)
    model({k: v.float() for k, v in inputs[0].items()}, inputs[1])  # initialise the lazy sizes
    model = randomize_(model).double().eval()
    pruned = _check_pruned(model, inputs, [_hetero_graph(13, 9, 30, seed=1)])
    assert set(pruned(*inputs)) == {"paper", "author"}


def test_message_norm_scales_messages_per_node_and_prunes():
    """PyG's MessageNorm: ``msg / ||msg|| * ||x|| * s`` per node, a norm over the channels
    (zeros add nothing to it), so both inputs' channels prune together."""
    from torch_geometric.nn import MessageNorm

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = nn.Linear(8, 16), GCNConv(8, 16)
            self.norm, self.head = MessageNorm(learn_scale=True), nn.Linear(16, 3)

        def forward(self, x, edge_index):
            return self.head(F.relu(self.norm(self.lin(x), self.conv(x, edge_index))))

    torch.manual_seed(0)
    model = randomize_(M()).double().eval()
    pruned = _check_pruned(model, graph(10, 30), [graph(17, 40, seed=2)])
    assert pruned.lin.weight.shape[0] == 8
