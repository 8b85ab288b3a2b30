"""Shape records nest: a node that outputs tuples, lists or dicts of tensors inside tuples (a PyG
layer's ``(out, (edge_index, alpha))``, an LSTM's ``(out, (h, c))``) has every tensor recorded,
each one is a space (``Space.item(node, (1, 0), d)``), and ``getitem`` chains (``out[1][0]``)
reach them, so channels couple through and prune exactly."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.graph.shapes import record_shapes, shape_record
from structprune.rules import Couple, OpRule, Space, record_at, record_leaves
from structprune.testing import assert_oracle

S = torch.Size


def test_records_nest_tuples_lists_and_dicts():
    t = torch.zeros
    assert shape_record(t(2, 3)) == S([2, 3])
    assert shape_record((t(2), (t(3), t(4, 1)))) == [S([2]), [S([3]), S([4, 1])]]
    assert shape_record([t(1), 5, {"a": t(2), "b": "x"}]) == [S([1]), None, {"a": S([2]), "b": None}]
    assert shape_record((1, (2, "x"))) is None  # no tensor anywhere: a value, not a record
    assert shape_record(S([2, 3])) is None  # a size is a tuple of ints
    rec = [S([1]), [S([3]), {"k": S([4, 1])}]]
    assert list(record_leaves(rec)) == [((0,), S([1])), ((1, 0), S([3])), ((1, 1, "k"), S([4, 1]))]
    assert record_at(rec, (1, 1, "k")) == S([4, 1]) and record_at(rec, (1, 5)) is None


def test_nested_item_spaces_have_one_canonical_form():
    assert Space.item("lstm", (1,), 0) == Space.item("lstm", 1, 0)
    s = Space.item("lstm", (1, 0), 2)
    assert s.item_path == (1, 0) and s.is_item and s.node == "lstm"
    assert str(s) == "lstm#1#0[2]" and s.with_dim(0) == Space.item("lstm", (1, 0), 0)
    assert Space.item("lstm", 1, 0).item_path == (1,) and Space.activation("x", 0).item_path == ()


class Fork(nn.Module):
    """``x -> (2x, (tanh x, relu x))``: a leaf (it has a rule) with a nested tuple output."""

    def forward(self, x):
        return x * 2.0, (torch.tanh(x), F.relu(x))


class ForkRule(OpRule):
    """Every channel of ``x`` is the same channel of ``y``, ``z`` and ``w`` (paths into the
    nested output); it also keeps the one-level view of the output it was given."""

    seen: list = []

    def couple(self, ctx):
        x = ctx.arg(0, "x")
        ForkRule.seen.append((ctx.item_shapes(ctx.node), ctx.item_leaves(ctx.node),
                              ctx.item(0, -1)))
        for path in [0, (1, 0), (1, 1)]:
            for d in range(len(ctx.shape(x))):
                yield Couple(ctx.space(x, d), ctx.item(path, d))


class ForkNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.fork = Fork()
        self.b, self.c, self.d = nn.Linear(12, 5), nn.Linear(12, 5), nn.Linear(12, 5)

    def forward(self, x):
        y, (z, w) = self.fork(self.a(x))
        return self.b(y) + self.c(z) * self.d(w)


def test_getitem_chains_reach_nested_tensors_and_prune():
    torch.manual_seed(0)
    model = ForkNet().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    ForkRule.seen.clear()
    pruner = sp.Pruner(model, (x,), ratio=0.5, rules={Fork: ForkRule()})
    g = pruner.graph
    fork = next(n for n in g.graph_module.graph.nodes if n.op == "call_module"
                and n.target == "fork")
    assert g.shapes[fork.name] == [S([4, 12]), [S([4, 12]), S([4, 12])]]
    # One level for rules written against it: the nested item reads as None.
    item_shapes, leaves, first = ForkRule.seen[0]
    assert item_shapes == [S([4, 12]), None]
    assert leaves == [((0,), (4, 12)), ((1, 0), (4, 12)), ((1, 1), (4, 12))]
    assert first == Space.item(fork.name, 0, 1)
    # out[1][0] and out[1][1] are coupled to a's channels through the getitem chain.
    (grp,) = [grp for grp in g.groups() if grp.num_units == 12]
    spaces = set(grp.spaces) if hasattr(grp, "spaces") else {m.space for m in grp.members}
    assert {Space.item(fork.name, (1, 0), 1), Space.item(fork.name, (1, 1), 1)} <= spaces
    plan = pruner.plan()
    pruned = assert_oracle(pruner, plan, tol=1e-12)
    for name in ("a", "b", "c", "d"):
        lin = pruned.get_submodule(name)
        assert (lin.out_features if name == "a" else lin.in_features) == 6, name


class ForkOut(nn.Module):
    """Returns the nested tuple itself: the model's output record nests too."""

    def __init__(self):
        super().__init__()
        self.a, self.fork, self.b = nn.Linear(6, 12), Fork(), nn.Linear(12, 12)

    def forward(self, x):
        y, (z, w) = self.fork(self.a(x))
        return self.b(y), (z + w, {"w": w})


def test_output_record_nests_and_its_tensors_stay():
    model = ForkOut().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    g = sp.trace(model, (x,), rules={Fork: ForkRule()})
    shapes, _ = record_shapes(g.graph_module, (x,), {})
    assert shapes["output"] == [S([3, 12]), [S([3, 12]), {"w": S([3, 12])}]]
    # Every output tensor keeps its width, so nothing before them may go.
    assert not [grp for grp in g.groups() if grp.num_units]


# ------------------------------------------------------------------------------------ PyG
class GATAlpha(nn.Module):
    """Two ``GATConv(..., return_attention_weights=True)`` layers whose attention weights are
    used: added to the features (``alpha.mean()``), or returned with the output."""

    def __init__(self, returns):
        super().__init__()
        from torch_geometric.nn import GATConv

        self.c1, self.c2 = GATConv(8, 16, heads=2), GATConv(32, 4)
        self.returns = returns

    def forward(self, x, edge_index):
        h, (_, alpha) = self.c1(x, edge_index, return_attention_weights=True)
        h = F.relu(h) + alpha.mean()
        out, (ei, alpha2) = self.c2(h, edge_index, return_attention_weights=True)
        return (out, (ei, alpha2)) if self.returns else out + alpha2.mean()


@pytest.mark.parametrize("returns", [False, True])
def test_gat_with_attention_weights_prunes(returns):
    pytest.importorskip("torch_geometric")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, 10, (2, 30), generator=g)
    model = GATAlpha(returns).double().eval()
    pruner = sp.Pruner(model, (x, edge_index), ratio=0.5)
    plan = pruner.plan()
    assert not plan.is_empty
    pruned = assert_oracle(pruner, plan, tol=1e-9)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    if returns:  # (out, (edge_index with self-loops, alpha)) is one nested record
        out_rec = pruner.graph.shapes["output"]
        (p_out, s_out), (p_ei, s_ei), (p_a, s_a) = record_leaves(out_rec)
        assert (p_out, p_ei, p_a) == ((0,), (1, 0), (1, 1))
        assert s_out == S([10, 4]) and s_ei[0] == 2 and s_a == S([s_ei[1], 1])
