"""UGS graph lottery tickets trained on sampled mini-batches, for graphs too large for full-batch
training (``find_ticket(..., num_neighbors=[15, 10], batch_size=1024)``).

Same algorithm as :mod:`structprune.gnn.ticket` (ALGORITHMS.md §2.3), with every full-graph pass
replaced by a pass over neighbour-sampled mini-batches:

- The edge mask stays **global**, one entry per column of ``data.edge_index``. A batch carries
  ``batch.e_id``, the global id of each sampled edge, and the model sees ``mask[batch.e_id]``;
  autograd scatters the batch's gradient back into the global mask. Weight masks are as in the
  full-batch path. One Adam over the weights and both masks takes one step per batch; each step
  adds the L1 subgradients ``s1·sign(m_g)`` and ``s2·sign(m_θ)`` to *every* entry, as the
  full-batch objective does.
- **Edges a batch did not sample** get no loss gradient from it (exactly zero), but the L1 term
  and Adam's weight decay still act on them. An edge never sampled during the whole mask stage
  is scored like an edge the training loss does not depend on in full-batch UGS: only the L1
  term (and weight decay) moves it, by about ``lr`` per step towards 0, so it tends to be pruned
  early. (With ``s1 = 0`` and no weight decay it keeps its initial value exactly.) ``history`` reports how
  many kept edges the mask stage sampled at least once (``edges_sampled``).
- Counts stay exact: after each mask stage ``prune_lowest`` runs on the global masks, so every
  round prunes ``int(n·rate) + 1`` of the ``n`` kept edges / weights, as in the full-batch path.
- Sampling runs on the graph of the still kept edges (a pruned edge is never sampled: for the
  ``"edge_weight"`` route that equals a zero weight, for ``"explain"`` it is the physically-
  removed semantics that the full-batch fixed-mask stage uses).
- Training seeds are the ``train_mask`` nodes (shuffled, ``batch_size`` per batch, the loss is
  the mean cross-entropy over a batch's seeds); evaluation samples the ``val_mask`` /
  ``test_mask`` nodes in batches with a sampler re-seeded at every evaluation (the same subgraphs
  every epoch), and accuracy is the fraction of those nodes predicted right, as in the full-batch
  path. :func:`evaluate` repeats it, so it reproduces a round's ``val_acc`` / ``test_acc``.

Batches come from PyG's :class:`~torch_geometric.loader.NodeLoader` (the loader behind
``NeighborLoader``: ``n_id``, ``e_id``, ``batch_size``, ``x`` and ``y`` gathered by PyG's
``filter_data``) with :class:`UniformNeighborSampler`, a plain-torch sampler with the
semantics of PyG's default ``NeighborSampler`` (directional, sampled without replacement,
``num_neighbors[h]`` incoming edges of every node first reached at hop ``h``, the seeds being
hop 0; ``-1`` = all of them).
PyG's own ``NeighborSampler`` needs ``pyg-lib`` or ``torch-sparse``, compiled extensions that
this project's environment does not have (pyg-lib is not on PyPI); this sampler needs neither, and
is seeded, so a run is reproducible.

With ``num_neighbors = [-1] * k``, ``k`` large enough that the sampled subgraph holds every edge,
and ``batch_size >= train nodes`` (one batch), the mini-batch path computes the same losses,
gradients and Adam steps as the full-batch path (tested). Otherwise the mini-batch model sees
each node's *sampled* neighbourhood, and normalisations computed inside the model (GCN degrees)
are those of the sampled subgraph, as for any mini-batch GNN training.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import masks as _masks
from . import ticket as _ticket


def _sampler_base():
    from torch_geometric.sampler import BaseSampler

    return BaseSampler


class UniformNeighborSampler(_sampler_base()):  # type: ignore[misc]
    """Neighbour sampling in plain torch for PyG's ``NodeLoader``, with the semantics of PyG's
    default ``NeighborSampler`` on a homogeneous graph.

    From the seeds, hop ``h`` takes ``num_neighbors[h]`` incoming edges ``j -> i`` of every node
    ``i`` first reached at hop ``h - 1`` (uniformly, without replacement; all of them when the
    node has fewer, or when the entry is ``-1``), and the sources ``j`` not yet in the batch are
    the next hop's nodes. The seeds are the batch's first nodes. ``SamplerOutput.edge`` holds
    the sampled edges' columns in ``edge_index`` (the loader turns it into ``batch.e_id``).

    Args:
        edge_index: ``(2, E)`` long tensor, source row first.
        num_nodes: number of nodes.
        num_neighbors: edges per node per hop (``> 0`` or ``-1``).
        seed: seeds the sampler's own ``torch.Generator`` (see :meth:`reseed`).
    """

    def __init__(self, edge_index: Tensor, num_nodes: int, num_neighbors: Sequence[int], seed: int = 0) -> None:
        _check_neighbors(num_neighbors)
        self.num_neighbors = [int(k) for k in num_neighbors]
        edge_index = edge_index.cpu()
        dst = edge_index[1]
        self.perm = torch.sort(dst, stable=True).indices  # column of edge_index for each CSC slot
        self.row = edge_index[0][self.perm]
        self.colptr = torch.zeros(num_nodes + 1, dtype=torch.long)
        self.colptr[1:] = torch.cumsum(torch.bincount(dst, minlength=num_nodes), 0)
        self.num_nodes = num_nodes
        self.generator = torch.Generator().manual_seed(seed)
        self._local = torch.full((num_nodes,), -1, dtype=torch.long)

    def reseed(self, seed: int) -> None:
        """Restart the sampler's random stream (the same seed gives the same batches)."""
        self.generator.manual_seed(seed)

    def sample_from_nodes(self, index, **kwargs):
        """Sample the subgraph of the seeds ``index.node`` (a ``NodeSamplerInput``)."""
        out = self.sample(index.node)
        out.metadata = (index.input_id, index.time)
        return out

    def sample_from_edges(self, index, neg_sampling=None):
        raise NotImplementedError("UniformNeighborSampler samples from seed nodes only (node classification)")

    def sample(self, seeds: Tensor):
        """The ``SamplerOutput`` (node, row, col, edge, per-hop counts) of the seeds ``seeds``."""
        from torch_geometric.sampler import SamplerOutput

        seeds = seeds.to(torch.long)
        local = self._local
        nodes, rows, cols, edges = [seeds], [], [], []
        local[seeds] = torch.arange(seeds.numel())
        if bool((local[seeds] != torch.arange(seeds.numel())).any()):
            local[seeds] = -1
            raise ValueError("UniformNeighborSampler: the seed nodes of a batch must be distinct")
        count = seeds.numel()
        frontier = seeds
        num_sampled_nodes, num_sampled_edges = [count], []
        try:
            for k in self.num_neighbors:
                start = self.colptr[frontier]
                deg = self.colptr[frontier + 1] - start
                seg = torch.repeat_interleave(torch.arange(frontier.numel()), deg)
                offs = torch.arange(seg.numel()) - torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg)
                pos = start[seg] + offs
                if k >= 0 and bool((deg > k).any()):
                    # a random order within each node's in-edges; keep its first k
                    key = seg.to(torch.float64) + torch.rand(seg.numel(), generator=self.generator,
                                                             dtype=torch.float64)
                    pos = pos[torch.argsort(key)]
                    keep = offs < k
                    pos, seg = pos[keep], seg[keep]
                src = self.row[pos]
                new = torch.unique(src[local[src] < 0])
                local[new] = torch.arange(count, count + new.numel())
                count += new.numel()
                nodes.append(new)
                rows.append(local[src])
                cols.append(local[frontier][seg])
                edges.append(self.perm[pos])
                num_sampled_nodes.append(new.numel())
                num_sampled_edges.append(pos.numel())
                frontier = new
            node = torch.cat(nodes)
        finally:
            local[torch.cat(nodes)] = -1
        empty = torch.zeros(0, dtype=torch.long)
        return SamplerOutput(
            node=node,
            row=torch.cat(rows) if rows else empty,
            col=torch.cat(cols) if cols else empty,
            edge=torch.cat(edges) if edges else empty,
            num_sampled_nodes=num_sampled_nodes,
            num_sampled_edges=num_sampled_edges,
        )


def _check_neighbors(num_neighbors: Any) -> None:
    ok = (isinstance(num_neighbors, (list, tuple)) and len(num_neighbors) > 0
          and all(isinstance(k, int) and not isinstance(k, bool) and (k > 0 or k == -1) for k in num_neighbors))
    if not ok:
        raise ValueError(
            f"find_ticket: num_neighbors must be a non-empty list of ints, one per message-passing hop, each "
            f"> 0 (edges sampled per node) or -1 (all of them), e.g. [15, 10]; got {num_neighbors!r}"
        )


def _check_batch_size(batch_size: Any) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"find_ticket: batch_size must be an int >= 1 (seed nodes per mini-batch), got {batch_size!r}")


def neighbor_loader(
    data: Any,
    num_neighbors: Sequence[int],
    input_nodes: Tensor,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
):
    """PyG ``NodeLoader`` over ``input_nodes`` (bool mask or indices) of ``data`` with a
    :class:`UniformNeighborSampler` seeded by ``seed``; each batch has ``x``, ``y``,
    ``edge_index`` (local), ``n_id``, ``e_id`` (columns of ``data.edge_index``) and
    ``batch_size`` (its seeds come first). Only ``x``, ``y`` and ``edge_index`` are carried."""
    from torch_geometric.data import Data
    from torch_geometric.loader import NodeLoader

    _check_neighbors(num_neighbors)
    _check_batch_size(batch_size)
    graph = Data(x=data.x, y=data.y, edge_index=data.edge_index, num_nodes=data.num_nodes)
    sampler = UniformNeighborSampler(data.edge_index, data.num_nodes, num_neighbors, seed)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return NodeLoader(graph, node_sampler=sampler, input_nodes=input_nodes.cpu(), batch_size=batch_size,
                      shuffle=shuffle, generator=generator)


def _batches(loader, seed: int) -> Iterator[Any]:
    """The loader's batches, its sampler (and shuffle) restarted at ``seed``."""
    loader.node_sampler.reseed(seed)
    gen = getattr(loader, "generator", None)
    if gen is not None:
        gen.manual_seed(seed)
    yield from loader


def _masked_forward(model, batch, route, m_g, params, kept=None):
    """The model on one batch; ``m_g`` (global edge mask) indexed by the batch's global edge ids
    (``kept[batch.e_id]`` when the loader samples the graph of the ``kept`` edges)."""
    if m_g is None:
        return _masks.forward(model, batch.x, batch.edge_index, route, None, params)
    e_id = batch.e_id if kept is None else kept[batch.e_id]
    return _masks.forward(model, batch.x, batch.edge_index, route, m_g[e_id], params)


def _accuracy(model, loader, seed, route, m_g, params_fn, kept=None) -> float:
    """Fraction of the loader's seeds predicted right (eval mode, no grad)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in _batches(loader, seed):
            out = _masked_forward(model, batch, route, m_g, params_fn(), kept)
            n = batch.batch_size
            correct += int((out[:n].argmax(-1) == batch.y[:n]).sum())
            total += n
    return correct / max(total, 1)


def evaluate(
    model: nn.Module,
    data: Any,
    mask: Tensor,
    num_neighbors: Sequence[int],
    batch_size: int = 1024,
    seed: int = 0,
) -> float:
    """Accuracy of ``model(x, edge_index)`` on the nodes of ``mask``, evaluated on neighbour-
    sampled mini-batches as the mini-batch :func:`find_ticket` evaluates (same ``num_neighbors``,
    ``batch_size`` and ``seed`` reproduce its ``val_acc`` / ``test_acc`` on ``Ticket.data``)."""
    loader = neighbor_loader(data, num_neighbors, mask, batch_size, shuffle=False, seed=seed)
    was = model.training
    try:
        return _accuracy(model, loader, seed, "edge_weight", None, lambda: None)
    finally:
        model.train(was)


def _search_masks(model, data, route, theta0, alive_g, alive_w, epochs, lr, weight_decay, s1, s2, seed,
                  noise, dtype, progress, num_neighbors, batch_size) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The mask stage on mini-batches: the soft masks at the best validation epoch, and which
    edges were sampled at least once (bool, global)."""
    torch.manual_seed(seed)
    model.load_state_dict(theta0)
    named = dict(model.named_parameters())

    def soft(alive: Tensor, like_dtype) -> Tensor:
        binary = alive.to(like_dtype)
        m = binary + (2 * torch.rand(binary.shape, dtype=like_dtype, device=binary.device) - 1) * noise * binary
        return m.requires_grad_(True)

    fixed_w = {n: a.to(named[n].dtype) for n, a in alive_w.items()}
    m_g = soft(alive_g, dtype)
    m_w = {n: soft(a, named[n].dtype) for n, a in alive_w.items()}
    kept = alive_g.nonzero().squeeze(1)
    graph = _kept_graph(data, kept)
    train = neighbor_loader(graph, num_neighbors, data.train_mask, batch_size, shuffle=True, seed=seed)
    val = neighbor_loader(graph, num_neighbors, data.val_mask, batch_size, shuffle=False, seed=seed)
    opt = torch.optim.Adam(list(model.parameters()) + [m_g] + list(m_w.values()), lr=lr,
                           weight_decay=weight_decay)
    sampled = torch.zeros_like(alive_g)
    best_val, best = -1.0, None
    params = lambda: {n: named[n] * m_w[n] * fixed_w[n] for n in m_w}  # noqa: E731
    bar = _ticket._bar(epochs, "  masks", progress, leave=False)
    for epoch in range(epochs):
        for batch in _batches(train, seed + epoch):
            sampled[kept[batch.e_id]] = True
            model.train()
            opt.zero_grad()
            out = _masked_forward(model, batch, route, m_g, params(), kept)
            n = batch.batch_size
            F.cross_entropy(out[:n], batch.y[:n]).backward()
            with torch.no_grad():
                for m, scale in [(m_g, s1)] + [(m, s2) for m in m_w.values()]:
                    if m.grad is None:
                        m.grad = torch.zeros_like(m)
                    m.grad.add_(scale * torch.sign(m))
            opt.step()
        acc = _accuracy(model, val, seed, route, m_g, params, kept)
        if acc > best_val:
            best_val = acc
            best = (m_g.detach().clone(), {n: m.detach().clone() for n, m in m_w.items()})
        bar.update()
    bar.close()
    return best[0], best[1], sampled


def _kept_graph(data: Any, kept: Tensor) -> Any:
    from torch_geometric.data import Data

    return Data(x=data.x, y=data.y, edge_index=data.edge_index[:, kept], num_nodes=data.num_nodes)


def train_ticket(
    model: nn.Module,
    data: Any,
    edge_mask: Tensor,
    weight_masks: dict[str, Tensor],
    init_state: dict[str, Tensor] | None = None,
    epochs: int = 200,
    lr: float = 0.008,
    weight_decay: float = 8e-5,
    seed: int = 0,
    progress: bool = False,
    num_neighbors: Sequence[int] = (15, 10),
    batch_size: int = 1024,
) -> tuple[float, float, dict[str, Tensor]]:
    """The fixed-mask stage on mini-batches: rewind ``model`` to ``init_state`` (if given), train
    ``epochs`` passes over the training nodes (one Adam step per batch) on the graph without the
    pruned edges, pruned weights held at zero; return ``(val_acc, test_acc, state)`` at the best
    validation epoch, accuracies as :func:`evaluate` computes them."""
    _check_neighbors(list(num_neighbors))
    _check_batch_size(batch_size)
    torch.manual_seed(seed)
    if init_state is not None:
        model.load_state_dict(init_state)
    pruned = _ticket.prune_edges(data, edge_mask)
    train = neighbor_loader(pruned, list(num_neighbors), data.train_mask, batch_size, shuffle=True, seed=seed)
    val = neighbor_loader(pruned, list(num_neighbors), data.val_mask, batch_size, shuffle=False, seed=seed)
    test = neighbor_loader(pruned, list(num_neighbors), data.test_mask, batch_size, shuffle=False, seed=seed)
    named = dict(model.named_parameters())
    fixed = {n: m.to(named[n].dtype) for n, m in weight_masks.items()}
    params = lambda: {n: named[n] * m for n, m in fixed.items()}  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_val, best_test, best_state = -1.0, 0.0, None
    bar = _ticket._bar(epochs, "  ticket", progress, leave=False)
    for epoch in range(epochs):
        for batch in _batches(train, seed + epoch):
            model.train()
            opt.zero_grad()
            out = _masked_forward(model, batch, "edge_weight", None, params())
            n = batch.batch_size
            F.cross_entropy(out[:n], batch.y[:n]).backward()
            opt.step()
        acc = _accuracy(model, val, seed, "edge_weight", None, params)
        if acc > best_val:
            best_val, best_test = acc, _accuracy(model, test, seed, "edge_weight", None, params)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.update()
    bar.close()
    for n, m in fixed.items():
        best_state[n] = best_state[n] * m
    return best_val, best_test, best_state


def find_ticket(
    model: nn.Module,
    data: Any,
    num_neighbors: Sequence[int],
    batch_size: int = 1024,
    rounds: int = 20,
    graph_rate: float = 0.05,
    weight_rate: float = 0.2,
    epochs: int = 200,
    lr: float = 0.008,
    weight_decay: float = 8e-5,
    s1: float = 1e-2,
    s2: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    edge_route: str = "auto",
    weights: list[str] | None = None,
    noise: float = 1e-5,
) -> "_ticket.Ticket":
    """UGS on neighbour-sampled mini-batches (see the module docstring for how it differs from
    the full-batch :func:`structprune.gnn.find_ticket`, which calls this when given
    ``num_neighbors``). Arguments as there, plus:

    Args:
        num_neighbors: incoming edges sampled per node at each hop (``-1``: all), e.g.
            ``[15, 10]`` for a 2-layer GNN; one entry per message-passing layer as a rule.
        batch_size: seed nodes per mini-batch (training, validation and test alike).

    ``epochs`` counts passes over the training nodes (``ceil(train nodes / batch_size)`` Adam
    steps each). The returned :class:`~structprune.gnn.Ticket` is as in the full-batch path except
    that ``history`` has no ``macs`` (that needs a full-graph forward) and has ``edges_sampled``
    (kept edges the round's mask stage sampled at least once); its ``val_acc`` / ``test_acc`` are
    reproduced by :func:`evaluate` on ``Ticket.data`` with the same ``num_neighbors``,
    ``batch_size`` and ``seed``.

    Raises:
        ValueError: as the full-batch path, or ``num_neighbors`` is not a non-empty list of ints
            ``> 0`` or ``-1``, or ``batch_size`` is not an int ``>= 1``.
        ModelError: as the full-batch path (checked on the first sampled batch).
    """
    _ticket._check(data, rounds, graph_rate, weight_rate, epochs)
    _check_neighbors(num_neighbors)
    _check_batch_size(batch_size)
    num_neighbors = list(num_neighbors)
    route = _masks.resolve_route(model, edge_route)
    names = _masks.weight_names(model, weights)
    named = dict(model.named_parameters())
    ei = data.edge_index
    num_edges = ei.size(1)
    dtype = data.x.dtype if data.x.is_floating_point() else torch.float32
    if int(data.train_mask.sum()) == 0:
        raise ValueError("find_ticket: data.train_mask selects no node; mini-batches are seeded by the training nodes")
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = next(iter(neighbor_loader(data, num_neighbors, data.train_mask, batch_size, seed=seed)))
    _ticket._check_mask_reaches(model, first.x, first.edge_index, route, dtype)

    alive_g = torch.ones(num_edges, dtype=torch.bool, device=ei.device)
    alive_w = {n: torch.ones_like(named[n], dtype=torch.bool) for n in names}
    history: list[dict] = []
    state = theta0
    outer = _ticket._bar(rounds, "UGS rounds (mini-batch)", progress)
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        m_g, m_w, sampled = _search_masks(model, data, route, theta0, alive_g, alive_w, epochs, lr, weight_decay,
                                          s1, s2, seed, noise, dtype, progress, num_neighbors, batch_size)
        edges_sampled = int((sampled & alive_g).sum())
        alive_g = _masks.prune_lowest(m_g, alive_g, graph_rate)
        alive_w = _ticket._prune_weight_side(m_w, alive_w, weight_rate, None)
        val, test, state = train_ticket(model, data, alive_g, alive_w, theta0, epochs, lr, weight_decay, seed,
                                        progress, num_neighbors, batch_size)
        model.load_state_dict(state)
        kept_g = int(alive_g.sum())
        history.append({
            "round": r,
            "graph_sparsity": 1.0 - kept_g / num_edges,
            "edges_kept": kept_g,
            **_ticket._weights_row(model, alive_w),  # no MACs: that needs a full-graph forward
            "val_acc": val,
            "test_acc": test,
            "edges_sampled": edges_sampled,
            "seconds": time.perf_counter() - start,
        })
        outer.set_postfix(test=f"{test:.3f}", graph=f"{history[-1]['graph_sparsity']:.3f}",
                          weights=f"{history[-1]['weight_sparsity']:.3f}")
        outer.update()
    outer.close()

    ticket = _ticket._ticket(model, state, None, None, data, alive_g, alive_w, history, theta0)
    model.load_state_dict(theta0)
    return ticket
