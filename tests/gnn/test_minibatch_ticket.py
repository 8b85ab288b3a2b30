"""UGS on neighbour-sampled mini-batches (structprune/gnn/minibatch.py), on test_ticket's small
stochastic block model (60 nodes, 420 directed edges, 15 train / 15 val / 30 test nodes)."""

import pytest
import torch

pytest.importorskip("torch_geometric")

import torch.nn.functional as F  # noqa: E402

import structprune as sp  # noqa: E402
from models import gnn_ugs  # noqa: E402
from structprune.gnn import masks  # noqa: E402
from structprune.gnn import minibatch as mb  # noqa: E402
from structprune.gnn import ticket as ticket_mod  # noqa: E402

from .test_ticket import Gin, expected_counts, sbm, ugs_model  # noqa: E402

ROUNDS, EPOCHS, NEIGHBORS, BATCH = 3, 4, [3, 2], 6
ALL = [-1, -1, -1]  # three full hops sample every edge of sbm() from any of its splits (asserted below)


def run(**kw) -> "sp.gnn.Ticket":
    kw = {"rounds": ROUNDS, "epochs": EPOCHS, "lr": 0.05, "progress": False, "num_neighbors": NEIGHBORS,
          "batch_size": BATCH, **kw}
    return sp.gnn.find_ticket(ugs_model(), sbm(), **kw)  # num_neighbors: the mini-batch path


@pytest.fixture(scope="module")
def ticket():
    return run()


def in_degree(data):
    return torch.bincount(data.edge_index[1], minlength=data.num_nodes)


def test_batches_are_subgraphs_named_by_global_edge_ids():
    """n_id[edge_index] is data.edge_index[:, e_id]; the seeds come first; hop h samples
    min(in-degree, k_h) incoming edges of every node reached at hop h - 1, no edge twice."""
    data = sbm()
    deg = in_degree(data)
    loader = mb.neighbor_loader(data, [4, 3], data.train_mask, batch_size=5, shuffle=True, seed=1)
    seen = []
    for batch in loader:
        ei = data.edge_index
        assert torch.equal(batch.n_id[batch.edge_index], ei[:, batch.e_id])
        assert batch.e_id.unique().numel() == batch.e_id.numel()
        assert batch.n_id.unique().numel() == batch.n_id.numel()
        seeds = batch.n_id[:batch.batch_size]
        assert bool(data.train_mask[seeds].all())
        seen.append(seeds)
        torch.testing.assert_close(batch.x, data.x[batch.n_id])
        nodes = torch.tensor(batch.num_sampled_nodes).cumsum(0).tolist()
        edges = [0] + torch.tensor(batch.num_sampled_edges).cumsum(0).tolist()
        for h, k in enumerate([4, 3]):
            targets = batch.edge_index[1, edges[h]:edges[h + 1]]
            frontier = torch.arange(nodes[h - 1] if h else 0, nodes[h])
            counts = torch.bincount(targets, minlength=batch.num_nodes)[frontier]
            assert torch.equal(counts, deg[batch.n_id[frontier]].clamp(max=k))
            assert bool((targets >= frontier[0]).all()) and bool((targets <= frontier[-1]).all())
    assert torch.equal(torch.cat(seen).sort().values, data.train_mask.nonzero().squeeze(1))


def test_full_hops_sample_every_edge_of_the_small_graph():
    data = sbm()
    for split in ("train_mask", "val_mask", "test_mask"):
        batch = next(iter(mb.neighbor_loader(data, ALL, data[split], batch_size=100)))
        assert batch.batch_size == int(data[split].sum())
        assert torch.equal(batch.e_id.sort().values, torch.arange(data.edge_index.size(1)))


def test_kept_counts_per_round_are_exact(ticket):
    data, model = sbm(), ugs_model()
    num_weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert [h["edges_kept"] for h in ticket.history] == expected_counts(data.edge_index.size(1), 0.05, ROUNDS)
    assert [h["weights_kept"] for h in ticket.history] == expected_counts(num_weights, 0.2, ROUNDS)
    assert int(ticket.edge_mask.sum()) == ticket.history[-1]["edges_kept"]
    assert sum(int(m.sum()) for m in ticket.weight_masks.values()) == ticket.history[-1]["weights_kept"]
    assert torch.equal(ticket.data.edge_index, data.edge_index[:, ticket.edge_mask])
    for h in ticket.history:
        assert "macs" not in h and 0 < h["edges_sampled"] <= data.edge_index.size(1)


def test_ticket_reproduces_its_accuracies_with_evaluate(ticket):
    d = ticket.data
    assert mb.evaluate(ticket.model, d, d.test_mask, NEIGHBORS, BATCH, seed=0) == ticket.history[-1]["test_acc"]
    assert mb.evaluate(ticket.model, d, d.val_mask, NEIGHBORS, BATCH, seed=0) == ticket.history[-1]["val_acc"]
    for name, m in ticket.weight_masks.items():
        assert bool((dict(ticket.model.named_parameters())[name][~m] == 0).all())


def test_deterministic_under_a_seed(ticket):
    again = run()
    strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert strip(again.history) == strip(ticket.history)
    assert torch.equal(again.edge_mask, ticket.edge_mask)


def test_the_edge_mask_gets_loss_gradient_only_through_the_sampled_edges():
    """One batch: the global mask's gradient is non-zero only at the batch's e_id."""
    torch.manual_seed(0)
    data, model = sbm(), ugs_model()
    batch = next(iter(mb.neighbor_loader(data, [2, 2], data.train_mask, batch_size=4, seed=3)))
    m_g = torch.ones(data.edge_index.size(1), requires_grad=True)
    out = mb._masked_forward(model.eval(), batch, "edge_weight", m_g, None)
    F.cross_entropy(out[:batch.batch_size], batch.y[:batch.batch_size]).backward()
    outside = torch.ones_like(m_g, dtype=torch.bool)
    outside[batch.e_id] = False
    assert bool(outside.any()) and bool((m_g.grad[outside] == 0).all())
    assert int((m_g.grad[batch.e_id] != 0).sum()) >= batch.e_id.numel() // 2


@pytest.mark.parametrize("s1", [0.0, 1e-2])
def test_edges_never_sampled_move_only_by_the_l1_term(s1):
    """With s1 = 0 and no weight decay an edge no batch sampled keeps its initial soft value
    exactly; with s1 > 0 only the L1 subgradient moves it, down towards 0."""
    data, model = sbm(), ugs_model()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    num_edges = data.edge_index.size(1)
    alive_g = torch.ones(num_edges, dtype=torch.bool)
    alive_w = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() >= 2}
    m_g, _, sampled = mb._search_masks(model, data, "edge_weight", theta0, alive_g, alive_w, 2, 0.01, 0.0, s1, 0.0,
                                       0, 1e-5, torch.float32, False, [1], 4)
    torch.manual_seed(0)
    initial = 1 + (2 * torch.rand(num_edges) - 1) * 1e-5  # the soft mask's draw (seed 0, first draw)
    assert 0 < int(sampled.sum()) < num_edges
    never = ~sampled
    if s1 == 0:
        assert torch.equal(m_g[never], initial[never])
    else:
        assert bool((m_g[never] < initial[never] - 0.005).all())  # 2 epochs x 4 batches of Adam steps ~ -lr each


def _stage_inputs(alive_frac: float = 1.0):
    torch.manual_seed(0)
    model = gnn_ugs.build(3, 3, hidden=16, dropout=0.0)  # no dropout: both paths are deterministic
    data = sbm()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    alive_g = torch.rand(data.edge_index.size(1), generator=gen) < alive_frac
    alive_w = {n: torch.rand(p.shape, generator=gen) < alive_frac for n, p in model.named_parameters()}
    return model, data, theta0, alive_g, alive_w


def test_one_full_batch_equals_the_full_batch_gradients():
    """num_neighbors = [-1] * 3 and one batch of all training nodes: the batch is the whole graph
    (relabelled), and the gradients of the loss w.r.t. the global edge mask, the weight masks
    and the weights equal the full-batch path's."""
    model, data, _, alive_g, alive_w = _stage_inputs(0.8)
    named = dict(model.named_parameters())
    grads = []
    for path in ("full", "mini"):
        model.zero_grad()
        m_g = torch.linspace(0.5, 1.5, data.edge_index.size(1)).mul(alive_g).requires_grad_(True)
        m_w = {n: torch.full(named[n].shape, 0.9).mul(a).requires_grad_(True) for n, a in alive_w.items()}
        params = {n: named[n] * m_w[n] for n in m_w}
        if path == "full":
            out = masks.forward(model, data.x, data.edge_index, "edge_weight", m_g, params)
            loss = F.cross_entropy(out[data.train_mask], data.y[data.train_mask])
        else:
            batch = next(iter(mb.neighbor_loader(data, ALL, data.train_mask, batch_size=1000, shuffle=True)))
            out = mb._masked_forward(model, batch, "edge_weight", m_g, params)
            loss = F.cross_entropy(out[:batch.batch_size], batch.y[:batch.batch_size])
        loss.backward()
        grads.append([m_g.grad] + [m_w[n].grad for n in sorted(m_w)] + [named[n].grad for n in sorted(named)])
    assert float(grads[0][0].abs().sum()) > 0
    for full, mini in zip(*grads):
        torch.testing.assert_close(mini, full, rtol=1e-5, atol=1e-7)


def test_mask_stage_matches_the_full_batch_stage_step_for_step():
    """The whole mask stage (noise, one Adam over weights and masks, L1 on every entry, pruned
    entries, best-validation snapshot) with one full batch gives the full-batch stage's masks."""
    model, data, theta0, alive_g, alive_w = _stage_inputs(0.85)
    args = (theta0, alive_g, alive_w, 5, 0.01, 8e-5, 1e-2, 1e-2, 0, 1e-5, torch.float32, False)
    full_g, full_w = ticket_mod._search_masks(model, data, "edge_weight", *args)
    mini_g, mini_w, sampled = mb._search_masks(model, data, "edge_weight", *args, ALL, 1000)
    assert torch.equal(sampled, alive_g)
    assert float((full_g - 1).abs().max()) > 0.02  # the masks did move
    torch.testing.assert_close(mini_g, full_g, rtol=0, atol=1e-5)
    for n in full_w:
        torch.testing.assert_close(mini_w[n], full_w[n], rtol=0, atol=1e-5)
    assert torch.equal(masks.prune_lowest(mini_g, alive_g, 0.05), masks.prune_lowest(full_g, alive_g, 0.05))


def test_explain_route_on_mini_batches():
    t = mb.find_ticket(Gin(), sbm(), num_neighbors=[3], batch_size=8, rounds=2, epochs=2, progress=False)
    assert [h["edges_kept"] for h in t.history] == expected_counts(sbm().edge_index.size(1), 0.05, 2)


@pytest.mark.parametrize("bad", [[], [0], [15, -2], "15", [1.5], None, [True]])
def test_bad_num_neighbors_is_refused(bad):
    with pytest.raises(ValueError, match="num_neighbors must be a non-empty list of ints"):
        mb.find_ticket(ugs_model(), sbm(), num_neighbors=bad, rounds=1, epochs=1, progress=False)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_bad_batch_size_is_refused(bad):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        mb.find_ticket(ugs_model(), sbm(), num_neighbors=[2], batch_size=bad, rounds=1, epochs=1, progress=False)


def test_public_find_ticket_dispatches_on_num_neighbors(ticket):
    direct = mb.find_ticket(ugs_model(), sbm(), num_neighbors=NEIGHBORS, batch_size=BATCH, rounds=ROUNDS,
                            epochs=EPOCHS, lr=0.05, progress=False)
    assert torch.equal(direct.edge_mask, ticket.edge_mask)
    assert [h["test_acc"] for h in direct.history] == [h["test_acc"] for h in ticket.history]
    full = sp.gnn.find_ticket(ugs_model(), sbm(), rounds=1, epochs=1, progress=False)
    assert "macs" in full.history[0] and "edges_sampled" not in full.history[0]
    with pytest.raises(ValueError, match="batch_size is for mini-batch training; also pass num_neighbors"):
        sp.gnn.find_ticket(ugs_model(), sbm(), batch_size=8, rounds=1, epochs=1, progress=False)
    with pytest.raises(ValueError, match="structured=True has no mini-batch version"):
        sp.gnn.find_ticket(ugs_model(), sbm(), num_neighbors=[2], structured=True, rounds=1, epochs=1,
                           progress=False)
    with pytest.raises(ValueError, match="num_neighbors must be a non-empty list"):
        sp.gnn.find_ticket(ugs_model(), sbm(), num_neighbors=[], rounds=1, epochs=1, progress=False)


def test_other_refusals():
    data = sbm()
    data.train_mask = torch.zeros_like(data.train_mask)
    with pytest.raises(ValueError, match="train_mask selects no node"):
        mb.find_ticket(ugs_model(), data, num_neighbors=[2], rounds=1, epochs=1, progress=False)
    with pytest.raises(ValueError, match="graph_rate must lie in"):
        mb.find_ticket(ugs_model(), sbm(), num_neighbors=[2], graph_rate=1.0, rounds=1, epochs=1, progress=False)
    with pytest.raises(sp.ModelError, match="Gin.forward takes no edge_weight"):
        mb.find_ticket(Gin(), sbm(), num_neighbors=[2], edge_route="edge_weight", rounds=1, epochs=1,
                       progress=False)
    sampler = mb.UniformNeighborSampler(data.edge_index, data.num_nodes, [2])
    with pytest.raises(ValueError, match="seed nodes of a batch must be distinct"):
        sampler.sample(torch.tensor([1, 2, 1]))
    assert bool((sampler._local == -1).all())  # left clean for the next batch
