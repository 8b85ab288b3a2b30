"""sp.gnn.find_ticket(structured=True): one mask per coupled channel unit of structprune's groups
beside UGS's edge mask; the ticket is the physically smaller model on the pruned graph."""

import os

import pytest
import torch
import torch.nn as nn

pytest.importorskip("torch_geometric")

from torch_geometric.nn import SimpleConv  # noqa: E402

import structprune as sp  # noqa: E402
from models import gnn, gnn_ugs  # noqa: E402
from structprune.gnn import masks  # noqa: E402
from structprune.oracle import masked_output, max_rel_diff  # noqa: E402

from .test_ticket import expected_counts, sbm  # noqa: E402

ROUNDS, EPOCHS, HIDDEN = 3, 6, 16


def ugs_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return gnn_ugs.build(3, 3, hidden=HIDDEN)


ROUND_TICKETS: list = []


@pytest.fixture(scope="module")
def ticket():
    ROUND_TICKETS.clear()
    return sp.gnn.find_ticket(ugs_model(), sbm(), rounds=ROUNDS, epochs=EPOCHS, lr=0.05, progress=False,
                              structured=True, on_round=ROUND_TICKETS.append)


def accuracy(out, data, mask):
    return float((out[mask].argmax(-1) == data.y[mask]).float().mean())


def test_counts_per_round_are_exact(ticket):
    data = sbm()
    assert [h["channels_kept"] for h in ticket.history] == expected_counts(HIDDEN, 0.2, ROUNDS)
    assert [h["edges_kept"] for h in ticket.history] == expected_counts(data.edge_index.size(1), 0.05, ROUNDS)
    total = sum(p.numel() for p in ugs_model().parameters())
    for h in ticket.history:
        assert h["channel_sparsity"] == pytest.approx(1 - h["channels_kept"] / HIDDEN)
        assert h["weight_sparsity"] == pytest.approx(1 - h["weights_kept"] / total)
    last = ticket.history[-1]
    assert [int(m.sum()) for m in ticket.channel_masks.values()] == [last["channels_kept"]]
    assert sum(int(m.sum()) for m in ticket.weight_masks.values()) == last["weights_kept"]
    assert sum(p.numel() for p in ticket.model.parameters()) == last["weights_kept"]


def test_macs_are_those_of_the_physically_pruned_model_on_the_pruned_graph(ticket):
    """UGS's GCN aggregates, then transforms: Linear MACs N·(F·h + h·C) (structprune's counter)
    plus messages (E_kept + N self-loops)·(F + h) (one per message and channel)."""
    data = sbm()
    n, f, c = data.num_nodes, 3, 3
    for h in ticket.history:
        k, e = h["channels_kept"], h["edges_kept"]
        assert h["macs_dense"] == n * (f * k + k * c)
        assert h["macs_messages"] == (e + n) * (f + k)
        assert h["macs"] == h["macs_dense"] + h["macs_messages"]


def test_ticket_model_is_smaller_and_reproduces_the_last_accuracy(ticket):
    kept = ticket.history[-1]["channels_kept"]
    shapes = {n: tuple(p.shape) for n, p in ticket.model.named_parameters()}
    assert shapes == {"layers.0.weight": (kept, 3), "layers.1.weight": (3, kept)}
    d = ticket.data
    assert torch.equal(d.edge_index, sbm().edge_index[:, ticket.edge_mask])
    with torch.no_grad():
        out = ticket.model(d.x, d.edge_index)
    assert accuracy(out, d, d.test_mask) == ticket.history[-1]["test_acc"]
    assert accuracy(out, d, d.val_mask) == ticket.history[-1]["val_acc"]


def test_on_round_sees_each_round_s_physical_ticket(ticket):
    assert [len(t.history) for t in ROUND_TICKETS] == list(range(1, ROUNDS + 1))
    for t in ROUND_TICKETS:
        h = t.history[-1]
        assert sum(p.numel() for p in t.model.parameters()) == h["weights_kept"]
        assert int(t.edge_mask.sum()) == h["edges_kept"] == t.data.edge_index.size(1)
        with torch.no_grad():
            out = t.model(t.data.x, t.data.edge_index)
        assert accuracy(out, t.data, t.data.test_mask) == h["test_acc"]
    assert ROUND_TICKETS[-1].history == ticket.history
    assert torch.equal(ROUND_TICKETS[-1].edge_mask, ticket.edge_mask)


def test_ticket_model_runs_on_another_graph_size(ticket):
    """Same output as a UGS GCN built at the kept width with the ticket's weights."""
    kept = ticket.history[-1]["channels_kept"]
    ref = gnn_ugs.build(3, 3, hidden=kept).eval()
    ref.load_state_dict(dict(ticket.model.named_parameters()))
    torch.manual_seed(5)
    x, ei = gnn.example_inputs(num_features=3, num_nodes=97)
    with torch.no_grad():
        torch.testing.assert_close(ticket.model(x, ei), ref(x, ei))


def test_ticket_model_exports_to_onnx(ticket, tmp_path):
    pytest.importorskip("onnxruntime")
    d = ticket.data
    torch.manual_seed(6)
    other = gnn.example_inputs(num_features=3, num_nodes=41)
    import onnxruntime as ort

    path = os.path.join(tmp_path, "t.onnx")
    res = sp.export_onnx(ticket.model, (d.x, d.edge_index), path, check=True, check_inputs=[other])
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (other[0].numpy(), other[1].numpy()))))[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), ticket.model(*other), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["ugs", "gcn"])
def test_zero_mask_equals_removal(arch):
    """The oracle: gating the units' parameter slices with a 0/1 mask gives the physically pruned
    model and the engine's masked original (removed units' activations zeroed); on another graph
    too. PyG's GCNConv adds its bias after aggregation, so the bias is gated with the rows."""
    torch.manual_seed(1)
    model = ugs_model() if arch == "ugs" else gnn.build("gcn", num_features=3, num_classes=3, hidden=12)
    model.eval()
    data = sbm()
    units = masks.ChannelUnits(model, data.x, data.edge_index)
    assert units.gate_roles == "producers"
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    alive = {gid: torch.rand(n, generator=g) > 0.5 for gid, n in units.groups.items()}
    for a in alive.values():
        a[0] = True
    pruned = units.apply(alive)
    x2, ei2 = gnn.example_inputs(num_features=3, num_nodes=53)
    with torch.no_grad():
        for x, ei in ((data.x, data.edge_index), (x2, ei2)):
            gated = masks.forward(model, x, ei, "edge_weight", None, units.gated(named, alive))
            assert max_rel_diff(pruned(x, ei), gated) < 1e-5
        oracle = masked_output(units.pruner.graph, units.plan(alive))
        gated = masks.forward(model, data.x, data.edge_index, "edge_weight", None, units.gated(named, alive))
        assert max_rel_diff(gated, oracle) < 1e-5
        ones = units.gated(named, units.ones())
        assert torch.equal(masks.forward(model, data.x, data.edge_index, "edge_weight", None, ones),
                           model(data.x, data.edge_index))


def test_prune_lowest_units_ranks_globally_and_keeps_one_per_group():
    scores = {0: torch.tensor([0.1, -0.5, 0.3]), 1: torch.tensor([0.05, -0.02])}
    alive = {0: torch.ones(3, dtype=torch.bool), 1: torch.ones(2, dtype=torch.bool)}
    new = masks.prune_lowest_units(scores, alive, 0.5)  # 5 kept: int(2.5) + 1 = 3 go
    assert new[0].tolist() == [False, True, False] and new[1].tolist() == [True, False]
    # group 1's last unit (score 0.0, the smallest) stays; the next smallest goes instead
    last = {0: torch.ones(3, dtype=torch.bool), 1: torch.tensor([True, False])}
    new = masks.prune_lowest_units({0: torch.tensor([0.1, 0.9, 0.3]), 1: torch.tensor([0.0, 0.0])}, last, 0.2)
    assert new[0].tolist() == [False, True, True] and new[1].tolist() == [True, False]
    floor = {0: torch.tensor([False, True, False]), 1: torch.tensor([True, False])}
    again = masks.prune_lowest_units(scores, floor, 0.5)  # one unit per group: nothing can go
    assert all(torch.equal(again[g], floor[g]) for g in floor)


def test_mask_stage_keeps_pruned_units_at_zero():
    from structprune.gnn import ticket as ticket_mod

    model, data = ugs_model(), sbm()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    units = masks.ChannelUnits(model, data.x, data.edge_index)
    alive = {gid: torch.arange(n) % 3 != 0 for gid, n in units.groups.items()}
    alive_g = torch.ones(data.edge_index.size(1), dtype=torch.bool)
    lr = 0.01
    _, m_w = ticket_mod._search_masks(model, data, "edge_weight", theta0, alive_g, alive, 1, lr, 0.0, 1e3, 1e3,
                                      0, 1e-5, torch.float32, False, units)
    for gid, m in m_w.items():
        assert bool((m[~alive[gid]] == 0).all())
        torch.testing.assert_close(m[alive[gid]], torch.full_like(m[alive[gid]], 1 - lr), atol=1e-5 + 1e-6, rtol=0)


class _SigmoidHidden(nn.Module):
    """sigmoid(0) = 0.5: zeroing a channel's producing rows is not removal, zeroing its reading
    columns too is."""

    def __init__(self, pooled: bool = False):
        super().__init__()
        self.conv = SimpleConv(aggr="sum")
        self.lin1, self.lin2, self.pooled = nn.Linear(3, 8), nn.Linear(8, 3), pooled

    def forward(self, x, edge_index, edge_weight=None):
        h = torch.sigmoid(self.lin1(self.conv(x, edge_index, edge_weight)))
        return self.lin2(h) + h.sum(-1, keepdim=True) if self.pooled else self.lin2(h)


def test_gating_falls_back_to_all_members_where_producers_are_not_exact():
    torch.manual_seed(0)
    data = sbm()
    units = masks.ChannelUnits(_SigmoidHidden(), data.x, data.edge_index)
    assert units.gate_roles == "all members"


def test_channel_that_no_parameter_slice_can_zero_is_refused():
    """h.sum(-1) reads a sigmoid channel without a parameter: a zero mask could not remove it."""
    torch.manual_seed(0)
    with pytest.raises(sp.ModelError, match="does not reproduce the model with those units removed"):
        sp.gnn.find_ticket(_SigmoidHidden(pooled=True), sbm(), rounds=1, epochs=1, progress=False, structured=True)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = SimpleConv(aggr="sum")
        self.lin1, self.lin2 = nn.Linear(3, 8), nn.Linear(8, 3)

    def forward(self, x, edge_index, edge_weight=None):
        h = self.lin1(self.conv(x, edge_index, edge_weight))
        if h.sum() > 0:  # data-dependent branch: neither torch.fx nor torch.export captures it
            h = -h
        return self.lin2(h.relu())


class _NoHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.lin = SimpleConv(aggr="sum"), nn.Linear(3, 3)

    def forward(self, x, edge_index, edge_weight=None):
        return self.lin(self.conv(x, edge_index, edge_weight))


@pytest.mark.parametrize("model,kw,err,match", [
    (_Untraceable, {}, sp.ModelError, r"structured=True\): structprune cannot trace _Untraceable"),
    (_NoHidden, {}, sp.ModelError, "_NoHidden has no prunable channel unit"),
    (ugs_model, {"weights": ["layers.0.weight"]}, ValueError, r"structured=True\): weights= names parameters"),
])
def test_refusals(model, kw, err, match):
    with pytest.raises(err, match=match):
        sp.gnn.find_ticket(model(), sbm(), rounds=1, epochs=1, progress=False, structured=True, **kw)


def test_on_round_with_mini_batches_is_refused():
    with pytest.raises(ValueError, match="on_round has no mini-batch version"):
        sp.gnn.find_ticket(ugs_model(), sbm(), rounds=1, epochs=1, progress=False, num_neighbors=[5],
                           on_round=print)


def test_benchmark_picks_the_largest_mac_reduction_within_tolerance(ticket):
    """benchmarks/ugs_structured.py: the pick and the markdown table, on this ticket's history."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "ugs_structured.py")
    spec = importlib.util.spec_from_file_location("ugs_structured", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    hist = ticket.history
    best_acc = max(h["test_acc"] for h in hist)
    dense = {"test_acc": best_acc, "macs": 10 * hist[0]["macs"], "params": 1}
    within = [h for h in hist if h["test_acc"] >= best_acc - 1e-9]
    assert bench.pick(hist, dense, 0.0) == min(within, key=lambda h: h["macs"])
    assert bench.pick(hist, {**dense, "test_acc": 2.0}, 0.005) is None
    assert bench.pick(hist, {**dense, "test_acc": 0.0}, 0.005)["round"] == ROUNDS  # MACs fall every round
    lat = {"dense": {"torch": {"median_ms": 2.0, "ratio_to_dense": 1.0}, "ort": {"median_ms": 3.0, "ratio_to_dense": 1.0}}}
    md = bench.markdown({"dataset": "sbm", "model": "ugs", "hidden": HIDDEN, "rounds": ROUNDS, "epochs": EPOCHS,
                         "graph_rate": 0.05, "weight_rate": 0.2, "hyperparameters": {}, "threads": 1, "torch": "",
                         "loadavg_start": "", "macs_counted_by": "", "dense": dense, "history": hist,
                         "best_round": None, "latency": lat, "random": {"2": {"test_acc": 0.123}}})
    assert md.count("\n| ") == ROUNDS + 2 + 2  # header + dense + rounds; latency header + dense
    row2 = next(line for line in md.splitlines() if line.startswith("| 2 |"))
    assert row2.endswith("| 12.30 |") and md.count("12.30") == 1
