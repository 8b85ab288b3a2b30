"""sp.gnn.find_ticket: UGS (unified graph lottery tickets) as ALGORITHMS.md §2 specifies it, on a
small stochastic block model (3 communities, class = community, noisy one-hot features)."""

import pytest
import torch

pytest.importorskip("torch_geometric")

from torch_geometric.data import Data  # noqa: E402
from torch_geometric.nn import GATConv, GINConv  # noqa: E402
from torch_geometric.utils import stochastic_blockmodel_graph  # noqa: E402

import structprune as sp  # noqa: E402
from models import gnn_ugs  # noqa: E402
from structprune.gnn import masks  # noqa: E402

ROUNDS, EPOCHS = 3, 6


def sbm(seed: int = 0, sizes=(20, 20, 20)) -> Data:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probs = [[0.3 if i == j else 0.03 for j in range(len(sizes))] for i in range(len(sizes))]
    edge_index = stochastic_blockmodel_graph(list(sizes), probs)
    n = sum(sizes)
    y = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = torch.nn.functional.one_hot(y, len(sizes)).float() + 0.8 * torch.randn(n, len(sizes), generator=g)
    perm = torch.randperm(n, generator=g)
    masks_ = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    for m, part in zip(masks_, (perm[:15], perm[15:30], perm[30:])):
        m[part] = True
    edge_attr = torch.arange(edge_index.size(1), dtype=torch.float).unsqueeze(1)
    return Data(x=x, edge_index=edge_index, y=y, train_mask=masks_[0], val_mask=masks_[1], test_mask=masks_[2],
                edge_attr=edge_attr)


def ugs_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return gnn_ugs.build(3, 3, hidden=16)


def run(seed: int = 0, **kw) -> "sp.gnn.Ticket":
    kw = {"rounds": ROUNDS, "epochs": EPOCHS, "lr": 0.05, "progress": False, **kw}
    return sp.gnn.find_ticket(ugs_model(), sbm(), seed=seed, **kw)


@pytest.fixture(scope="module")
def ticket():
    return run()


def expected_counts(n: int, rate: float, rounds: int) -> list[int]:
    """ALGORITHMS.md §2.7: each round drops int(n * rate) + 1 of the n still kept entries."""
    out = []
    for _ in range(rounds):
        n -= int(n * rate) + 1
        out.append(n)
    return out


def test_kept_counts_per_round_are_exact(ticket):
    data, model = sbm(), ugs_model()
    num_edges = data.edge_index.size(1)
    num_weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    edges = expected_counts(num_edges, 0.05, ROUNDS)
    weights = expected_counts(num_weights, 0.2, ROUNDS)
    assert [h["edges_kept"] for h in ticket.history] == edges
    assert [h["weights_kept"] for h in ticket.history] == weights
    for k, (e, w) in enumerate(zip(edges, weights), start=1):
        assert abs(e - round(0.95 ** k * num_edges)) <= 1
        assert 0 <= 0.8 ** k * num_weights - w <= k  # int(n * rate) + 1 drops at most one extra per round
    assert int(ticket.edge_mask.sum()) == edges[-1]
    assert sum(int(m.sum()) for m in ticket.weight_masks.values()) == weights[-1]


def test_cora_counts_match_the_published_table():
    """§2.7's Cora numbers (10,556 directed edges, 737,280 weights) follow from the same rule."""
    assert expected_counts(10556, 0.05, 9)[3] == 8596 and expected_counts(10556, 0.05, 9)[8] == 6649
    assert expected_counts(737280, 0.2, 4) == [589823, 471858, 377486, 301988]
    alive = torch.ones(10556, dtype=torch.bool)
    for _ in range(4):
        alive = masks.prune_lowest(torch.rand(10556), alive, 0.05)
    assert int(alive.sum()) == 8596


def test_prune_lowest_drops_the_smallest_magnitudes_among_the_kept():
    scores = torch.tensor([0.5, -0.1, 0.0, 0.9, 0.2, -0.05, 0.3, 0.7])
    alive = torch.tensor([True, True, False, True, True, True, True, True])
    new = masks.prune_lowest(scores, alive, 0.3)  # 7 alive: int(2.1) + 1 = 3 dropped
    assert new.tolist() == [True, False, False, True, False, False, True, True]
    ties = masks.prune_lowest(torch.ones(5), torch.ones(5, dtype=torch.bool), 0.2)  # 2 dropped, by position
    assert ties.tolist() == [False, False, True, True, True]


def test_history_schema(ticket):
    keys = {"round", "graph_sparsity", "weight_sparsity", "val_acc", "test_acc", "macs", "seconds"}
    assert [h["round"] for h in ticket.history] == list(range(1, ROUNDS + 1))
    data = sbm()
    total_w = sum(m.numel() for m in ticket.weight_masks.values())
    for h in ticket.history:
        assert keys <= set(h)
        assert h["graph_sparsity"] == pytest.approx(1 - h["edges_kept"] / data.edge_index.size(1))
        assert h["weight_sparsity"] == pytest.approx(1 - h["weights_kept"] / total_w)
        assert 0 <= h["val_acc"] <= 1 and 0 <= h["test_acc"] <= 1
        assert isinstance(h["macs"], int) and h["macs"] > 0 and h["seconds"] > 0
    macs = [h["macs"] for h in ticket.history]
    assert macs == sorted(macs, reverse=True) and macs[0] > macs[-1]


def test_masks_are_bool_over_the_right_shapes(ticket):
    data, model = sbm(), ugs_model()
    assert ticket.edge_mask.dtype == torch.bool and ticket.edge_mask.shape == (data.edge_index.size(1),)
    params = dict(model.named_parameters())
    assert set(ticket.weight_masks) == {"layers.0.weight", "layers.1.weight"}
    for name, m in ticket.weight_masks.items():
        assert m.dtype == torch.bool and m.shape == params[name].shape
        weight = dict(ticket.model.named_parameters())[name]
        assert bool((weight[~m] == 0).all()) and bool((weight[m] != 0).any())


def test_ticket_data_has_exactly_the_kept_edges(ticket):
    data = sbm()
    keep = ticket.edge_mask
    assert torch.equal(ticket.data.edge_index, data.edge_index[:, keep])
    assert torch.equal(ticket.data.edge_attr, data.edge_attr[keep])
    for key in ("x", "y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(ticket.data[key], data[key])
    assert data.edge_index.size(1) > ticket.data.edge_index.size(1)


def test_ticket_model_reproduces_the_last_test_accuracy(ticket):
    d = ticket.data
    with torch.no_grad():
        out = ticket.model(d.x, d.edge_index)
    acc = float((out[d.test_mask].argmax(-1) == d.y[d.test_mask]).float().mean())
    assert acc == ticket.history[-1]["test_acc"]
    val = float((out[d.val_mask].argmax(-1) == d.y[d.val_mask]).float().mean())
    assert val == ticket.history[-1]["val_acc"]


def test_model_is_left_at_theta0_and_init_state_is_theta0():
    model, data = ugs_model(), sbm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = sp.gnn.find_ticket(model, data, rounds=1, epochs=3, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and torch.equal(t.init_state[k], before[k])


def test_deterministic_under_a_seed(ticket):
    again = run()
    strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert strip(again.history) == strip(ticket.history)
    assert torch.equal(again.edge_mask, ticket.edge_mask)
    for name, m in ticket.weight_masks.items():
        assert torch.equal(again.weight_masks[name], m)


def test_progress_bar_shows_only_when_asked(capsys):
    sp.gnn.find_ticket(ugs_model(), sbm(), rounds=1, epochs=2, progress=False)
    assert "UGS rounds" not in capsys.readouterr().err
    sp.gnn.find_ticket(ugs_model(), sbm(), rounds=1, epochs=2, progress=True)
    assert "UGS rounds" in capsys.readouterr().err


class Gat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = GATConv(3, 4, heads=2)
        self.conv2 = GATConv(8, 3)

    def forward(self, x, edge_index):
        return self.conv2(self.conv1(x, edge_index).relu(), edge_index)


class Gin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = GINConv(torch.nn.Linear(3, 3))

    def forward(self, x, edge_index):
        return self.conv(x, edge_index)


def test_explain_route_for_layers_without_edge_weight():
    torch.manual_seed(0)
    t = sp.gnn.find_ticket(Gat(), sbm(), rounds=2, epochs=4, progress=False)
    assert {"conv1.lin.weight", "conv1.att_src", "conv2.lin.weight"} <= set(t.weight_masks)
    assert [h["edges_kept"] for h in t.history] == expected_counts(sbm().edge_index.size(1), 0.05, 2)
    with torch.no_grad():
        out = t.model(t.data.x, t.data.edge_index)
    acc = float((out[t.data.test_mask].argmax(-1) == t.data.y[t.data.test_mask]).float().mean())
    assert acc == t.history[-1]["test_acc"]


def test_explain_route_multiplies_each_message():
    torch.manual_seed(0)
    model, data = Gin(), sbm()
    ei = data.edge_index
    keep = torch.rand(ei.size(1)) > 0.5
    masked = masks.forward(model, data.x, ei, "explain", keep.float())
    torch.testing.assert_close(masked, model(data.x, ei[:, keep]))
    assert not hasattr(model.conv, "_edge_mask") or model.conv._edge_mask is None  # hooks cleared


def test_edge_weight_route_is_ugs_normalisation_of_the_masked_graph():
    """A zero mask entry removes the edge from the messages and from the source-degree sums."""
    model, data = ugs_model().eval(), sbm()
    ei = data.edge_index
    keep = torch.rand(ei.size(1), generator=torch.Generator().manual_seed(1)) > 0.3
    masked = masks.forward(model, data.x, ei, "edge_weight", keep.float())
    torch.testing.assert_close(masked, model(data.x, ei[:, keep]))


@pytest.mark.parametrize("drop", ["edge_index", "train_mask", "y"])
def test_data_without_a_needed_attribute_is_refused(drop):
    data = sbm()
    del data[drop]
    with pytest.raises(ValueError, match=f"data has no '{drop}'"):
        sp.gnn.find_ticket(ugs_model(), data, rounds=1, epochs=1, progress=False)


@pytest.mark.parametrize("arg", [{"graph_rate": 0.0}, {"graph_rate": 1.0}, {"weight_rate": -0.1},
                                 {"weight_rate": 1.5}])
def test_rates_outside_the_open_unit_interval_are_refused(arg):
    name = next(iter(arg))
    with pytest.raises(ValueError, match=f"{name} must lie in \\(0, 1\\)"):
        sp.gnn.find_ticket(ugs_model(), sbm(), rounds=1, epochs=1, progress=False, **arg)


def test_model_without_edge_weight_on_that_route_is_refused():
    with pytest.raises(sp.ModelError, match=r"Gin\.forward takes no edge_weight.*edge_route='explain'"):
        sp.gnn.find_ticket(Gin(), sbm(), rounds=1, epochs=1, progress=False, edge_route="edge_weight")


def test_model_that_ignores_its_edge_weight_is_refused():
    class Ignores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x, edge_index, edge_weight=None):
            return self.lin(x)

    with pytest.raises(sp.ModelError, match="edge mask does not reach Ignores"):
        sp.gnn.find_ticket(Ignores(), sbm(), rounds=1, epochs=1, progress=False)
    with pytest.raises(sp.ModelError, match="Ignores has no torch_geometric MessagePassing"):
        sp.gnn.find_ticket(Ignores(), sbm(), rounds=1, epochs=1, progress=False, edge_route="explain")


def test_unknown_weight_name_is_refused():
    with pytest.raises(sp.ModelError, match="no parameter 'nope'"):
        sp.gnn.find_ticket(ugs_model(), sbm(), rounds=1, epochs=1, progress=False, weights=["nope"])


def test_self_loops_the_model_adds_are_never_masked():
    """All edges masked to zero leave each node its own self-loop (weight 1, added after masking)."""
    model, data = ugs_model().eval(), sbm()
    ei = data.edge_index
    zero = masks.forward(model, data.x, ei, "edge_weight", torch.zeros(ei.size(1)))
    torch.testing.assert_close(zero, model(data.x, ei[:, :0]))
    assert zero.abs().sum() > 0


def test_benchmark_random_baseline_matches_the_ticket_counts(ticket):
    """benchmarks/ugs_planetoid.py: random survivors at each round's exact counts, nested over
    rounds, and its markdown table renders a round per row."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "ugs_planetoid.py")
    spec = importlib.util.spec_from_file_location("ugs_planetoid", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = ugs_model()
    names = list(ticket.weight_masks)
    counts_g = [h["edges_kept"] for h in ticket.history]
    counts_w = [h["weights_kept"] for h in ticket.history]
    rows = bench.random_masks(model, names, counts_g, counts_w, ticket.edge_mask.numel(),
                              torch.Generator().manual_seed(0))
    prev = torch.ones_like(ticket.edge_mask)
    for (mg, mw), kg, kw in zip(rows, counts_g, counts_w):
        assert int(mg.sum()) == kg and sum(int(m.sum()) for m in mw.values()) == kw
        assert not bool((mg & ~prev).any())
        prev = mg
    seed_row = {"seed": 0, "dense": {"test_acc": 0.8, "macs": 10}, "ugs": ticket.history, "ugs_seconds": 1.0,
                "random": [{"test_acc": 0.5}] * ROUNDS}
    md = bench.markdown({"dataset": "sbm", "rounds": ROUNDS, "epochs": EPOCHS, "threads": 1, "seeds": [seed_row],
                         "targets": {}})
    assert md.count("\n| ") == ROUNDS + 2  # header, dense row, one per round


def test_mask_stage_adds_l1_subgradients_and_keeps_pruned_entries_at_zero():
    """One step of the mask stage with a dominant s1 / s2: Adam's first step moves every kept
    mask entry by lr against sign(grad + s * sign(m)) = -lr; pruned entries (M = 0) stay exactly 0;
    the masks start at M (1 + U(-noise, noise))."""
    from structprune.gnn import ticket as ticket_mod

    model, data = ugs_model(), sbm()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    alive_g = torch.rand(data.edge_index.size(1), generator=torch.Generator().manual_seed(2)) > 0.2
    alive_w = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) > 0.2
               for n, p in model.named_parameters()}
    lr, noise = 0.01, 1e-5
    m_g, m_w = ticket_mod._search_masks(model, data, "edge_weight", theta0, alive_g, alive_w, 1, lr, 0.0,
                                        1e3, 1e3, 0, noise, torch.float32, False)
    assert bool((m_g[~alive_g] == 0).all())
    torch.testing.assert_close(m_g[alive_g], torch.full_like(m_g[alive_g], 1 - lr), atol=noise + 1e-6, rtol=0)
    for name, m in m_w.items():
        assert bool((m[~alive_w[name]] == 0).all())
        torch.testing.assert_close(m[alive_w[name]], torch.full_like(m[alive_w[name]], 1 - lr),
                                   atol=noise + 1e-6, rtol=0)
    assert float((m_g[alive_g] - (1 - lr)).abs().max()) > 0  # the noise is there


@pytest.mark.parametrize("arch,route", [("gcn", "edge_weight"), ("graphsage", "explain"), ("gin", "explain"),
                                        ("gat", "explain"), ("gatv2", "explain")])
def test_reference_gnns_give_tickets_that_reproduce(arch, route):
    """models/gnn.py's nets: GCNConv takes the mask as edge_weight, the others through the explain
    hooks; the counts are exact and the ticket reproduces its last test accuracy."""
    from models import gnn

    torch.manual_seed(0)
    model, data = gnn.build(arch, num_features=3, num_classes=3), sbm()
    assert masks.resolve_route(model, "auto") == route
    t = sp.gnn.find_ticket(model, data, rounds=2, epochs=3, progress=False)
    assert [h["edges_kept"] for h in t.history] == expected_counts(data.edge_index.size(1), 0.05, 2)
    with torch.no_grad():
        out = t.model(t.data.x, t.data.edge_index)
    acc = float((out[t.data.test_mask].argmax(-1) == t.data.y[t.data.test_mask]).float().mean())
    assert acc == t.history[-1]["test_acc"]
