"""Unified graph lottery tickets (UGS): Chen, Sui, Chen, Zhang, Wang, "A Unified Lottery Ticket
Hypothesis for Graph Neural Networks" (ICML 2021), faithful to the official node-classification
code (VITA-Group/Unified-LTH-GNN ``NodeClassification/main_pruning_imp.py``, ``pruning.py``) as
``../shared/ALGORITHMS.md`` §2 specifies it, on sparse edge lists (no N x N adjacency).

Per round (``rounds`` of them):

1. *Find masks*: reload θ0 (the model's weights on entry) and the binary masks; soft masks
   ``m = M ⊙ (1 + U(-1e-5, 1e-5))`` on every directed edge and every prunable weight (re-drawn
   each round, seeded); ``epochs`` steps of one Adam over the weights *and* both masks (same lr,
   weight decay on the masks too), each step adding the L1 subgradients ``s1·sign(m_g)`` and
   ``s2·sign(m_θ)`` to the gradients after ``backward()``; at every new best validation accuracy
   the masks are snapshotted. From that snapshot, ``int(n·graph_rate) + 1`` of the ``n`` still
   kept edges with the smallest ``|m_g|`` are pruned, and ``int(n·weight_rate) + 1`` of the kept
   weights with the smallest ``|m_θ|``, ranked globally over all masked parameters.
2. *Train the ticket*: reload θ0 (rewinding), train ``epochs`` steps with the masks fixed; the
   round reports the test accuracy at the best validation epoch (single seed, as the official).

Deviations, all documented: the edge mask reaches the model by ``edge_route`` (see
:mod:`structprune.gnn.masks`; ``"edge_weight"`` is exact for ``models/gnn_ugs.py``); stage 2
trains on the graph with the pruned edges physically removed, which equals the official binary
mask for sum aggregations with edge-weighted normalisation (UGS's GCN, GCNConv) and is the
"clean" semantics for mean / softmax aggregations (the official GIN keeps a masked edge in its
mean's denominator, the official GAT gives it logit 0); ties at the pruning threshold are broken
by position, so every round prunes exactly ``int(n·rate) + 1``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ModelError
from . import masks as _masks


@dataclass
class Ticket:
    """The result of :func:`find_ticket`.

    Attributes:
        model: the ticket network after the last round's fixed-mask training, at its best
            validation epoch, pruned weights set to zero, in eval mode.
        data: a copy of the graph with the pruned edges removed from ``edge_index`` (and every
            per-edge attribute sliced alike); ``model(data.x, data.edge_index)`` reproduces
            ``history[-1]["test_acc"]``.
        edge_mask: bool, one entry per column of the original ``data.edge_index`` (True = kept).
        weight_masks: ``{parameter name: bool tensor}`` (True = kept). After a structured
            search: one mask over every parameter of the *original* model, False on the slices
            the removed channel units took away (so ``weights_kept`` = the parameters of
            ``model``).
        history: one dict per round: ``round``, ``graph_sparsity`` and ``weight_sparsity``
            (fractions pruned), ``edges_kept``, ``weights_kept``, ``val_acc`` and ``test_acc``
            (fractions, test at the best validation epoch), ``macs`` (of ``model`` on ``data``,
            see :func:`structprune.gnn.masks.count_macs`), ``seconds``. A structured search
            adds ``channels_kept`` / ``channel_sparsity`` (units over all groups) and counts
            ``macs`` on the physically pruned model on the pruned graph as ``macs_dense``
            (structprune's counter, :func:`structprune.gnn.masks.count_dense_macs`: linears,
            norms) plus ``macs_messages`` (the aggregations,
            :func:`structprune.gnn.masks.count_message_macs`); ``weight_sparsity`` is then the
            fraction of *all* the model's parameters removed.
        init_state: θ0, the weights every round rewinds to (apply ``weight_masks`` to retrain).
            After a structured search θ0 is the original (unpruned) model's.
        channel_masks: structured search only: ``{group id: bool per unit}`` (True = kept), group
            ids of ``sp.trace(model, (data.x, data.edge_index)).groups()``; ``None`` otherwise.
    """

    model: nn.Module
    data: Any
    edge_mask: Tensor
    weight_masks: dict[str, Tensor]
    history: list[dict] = field(default_factory=list)
    init_state: dict[str, Tensor] = field(default_factory=dict)
    channel_masks: dict[int, Tensor] | None = None


def _check(data: Any, rounds: int, graph_rate: float, weight_rate: float, epochs: int) -> None:
    for key in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        if getattr(data, key, None) is None:
            raise ValueError(
                f"find_ticket: data has no {key!r}; pass a torch_geometric Data with x, edge_index, "
                f"y and boolean train_mask / val_mask / test_mask (node classification)"
            )
    ei = data.edge_index
    if ei.dim() != 2 or ei.size(0) != 2:
        raise ValueError(f"find_ticket: data.edge_index must have shape (2, E), got {tuple(ei.shape)}")
    for name, rate in (("graph_rate", graph_rate), ("weight_rate", weight_rate)):
        if not 0.0 < rate < 1.0:
            raise ValueError(f"find_ticket: {name} must lie in (0, 1) (a fraction pruned per round), got {rate}")
    if rounds < 1 or epochs < 1:
        raise ValueError(f"find_ticket: rounds and epochs must be >= 1, got rounds={rounds}, epochs={epochs}")


def _accuracy(out: Tensor, y: Tensor, mask: Tensor) -> float:
    return float((out[mask].argmax(-1) == y[mask]).float().mean())


def _bar(total: int, desc: str, enabled: bool, leave: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=leave, dynamic_ncols=True)


def prune_edges(data: Any, edge_mask: Tensor) -> Any:
    """A copy of ``data`` without the edges where ``edge_mask`` is False (``edge_index`` and every
    per-edge attribute sliced; nodes kept as they are)."""
    return data.edge_subgraph(edge_mask)


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
) -> tuple[float, float, dict[str, Tensor]]:
    """UGS's fixed-mask stage (``run_fix_mask``): rewind ``model`` to ``init_state`` (if given),
    train ``epochs`` full-batch Adam steps on the graph without the pruned edges and with the
    pruned weights held at zero, and return ``(val_acc, test_acc, state)`` at the best validation
    epoch (``state``: the weights then, pruned ones zeroed). Also the dense and random baselines."""
    torch.manual_seed(seed)
    if init_state is not None:
        model.load_state_dict(init_state)
    pruned = prune_edges(data, edge_mask)
    x, ei, y = pruned.x, pruned.edge_index, pruned.y
    named = dict(model.named_parameters())
    fixed = {n: m.to(named[n].dtype) for n, m in weight_masks.items()}
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_val, best_test, best_state = -1.0, 0.0, None
    bar = _bar(epochs, "  ticket", progress, leave=False)
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        params = {n: named[n] * m for n, m in fixed.items()}
        out = _masks.forward(model, x, ei, "edge_weight", None, params)
        F.cross_entropy(out[pruned.train_mask], y[pruned.train_mask]).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            out = _masks.forward(model, x, ei, "edge_weight", None, {n: named[n] * m for n, m in fixed.items()})
        val = _accuracy(out, y, pruned.val_mask)
        if val > best_val:
            best_val, best_test = val, _accuracy(out, y, pruned.test_mask)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.update()
    bar.close()
    for n, m in fixed.items():
        best_state[n] = best_state[n] * m
    return best_val, best_test, best_state


def find_ticket(
    model: nn.Module,
    data: Any,
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
    structured: bool = False,
    on_round: Callable[[Ticket], Any] | None = None,
    num_neighbors: list[int] | None = None,
    batch_size: int | None = None,
) -> Ticket:
    """Find a unified graph lottery ticket (UGS, ALGORITHMS.md §2.3) for node classification.

    Args:
        model: a GNN called as ``model(x, edge_index)`` returning per-node class logits. Its
            weights on entry are θ0, the rewinding point; it is left at θ0 on return.
        data: a PyG ``Data`` with ``x``, ``edge_index``, ``y`` and ``train_mask`` / ``val_mask``
            / ``test_mask``. Every column of ``edge_index`` is one directed edge with its own mask
            entry, as UGS masks each directed adjacency entry (give both directions for an
            undirected graph). Only ``x`` and ``edge_index`` reach the model (``model(x,
            edge_index[, edge_weight=mask])``); other attributes (``edge_attr``, a graph's own
            ``edge_weight``) are not passed to it, and are sliced alike in ``Ticket.data``.
        rounds: pruning rounds; after ``k`` rounds ``n_k = n_{k-1} - int(n_{k-1}·rate) - 1``
            entries remain (≈ 0.95^k of the edges and 0.8^k of the weights at the defaults).
        graph_rate, weight_rate: fraction of the still kept edges / weights pruned per round.
        epochs: steps of each stage (mask search, then fixed-mask training).
        lr, weight_decay: Adam's, for weights and masks alike. Defaults: GCN on Cora (§2.6:
            lr 0.008, wd 8e-5; CiteSeer and PubMed use 0.01, 5e-4).
        s1, s2: L1 subgradient scales on the edge mask and the weight masks (§2.6: 1e-2 for GCN
            on Cora and CiteSeer, 1e-6 / 1e-3 on PubMed).
        seed: seeds the mask noise and dropout; re-applied at the start of every stage, as the
            official ``setup_seed``. (The official seeds are cora 2377, citeseer 4428, pubmed 3333.)
        progress: tqdm bars over rounds and epochs.
        edge_route: how the edge mask reaches the model: ``"edge_weight"`` (passed as
            ``edge_weight=``; faithful for ``models/gnn_ugs.py``), ``"explain"`` (PyG's explain
            hooks multiply every MessagePassing layer's messages) or ``"auto"`` (``edge_weight``
            when ``model.forward`` takes it). See :mod:`structprune.gnn.masks` for how each
            treats normalisation and self-loops (self-loops a layer adds are never masked).
        weights: names of the parameters to mask; default every parameter with >= 2 dims.
        noise: the soft masks start at ``M ⊙ (1 + U(-noise, noise))`` (official ``all_one``).
        structured: a structured ticket (not in the UGS paper): instead of one mask entry per
            weight, one per coupled channel unit that structprune's engine finds
            (``sp.trace(model, (data.x, data.edge_index)).groups()``; frozen dims get none),
            shared by all the unit's members; see :class:`structprune.gnn.masks.ChannelUnits`
            for how it scales the unit and the check that a mask of 0 equals removing it.
            ``weight_rate`` is then the fraction of the kept channel units pruned per round,
            ranked globally over all groups by ``|mask|`` (as UGS ranks weights), every group
            keeping at least one unit; ``s2`` scales their L1 term. The rest (rounds, edge
            mask, rewinding to θ0, best-validation snapshots) is as above. ``Ticket.model`` is
            then the physically smaller model (the engine's ``Plan`` applied: a model of the
            own class or an ``fx.GraphModule``, which runs on graphs of any size), and
            ``history`` counts its MACs on the pruned graph.
        on_round: called after every round with the :class:`Ticket` as it stands then
            (``model`` trained with that round's masks, ``data`` with its edges, ``history``
            so far): checkpoints, per-round measurements; an exception it raises stops the search.
        num_neighbors: train on neighbour-sampled mini-batches instead of the full graph (for
            graphs too large for full-batch training): edges sampled per node at each hop
            (``-1``: all), e.g. ``[15, 10]``; the edge mask stays one entry per column of
            ``edge_index``. See :mod:`structprune.gnn.minibatch` (``history`` then has no
            ``macs``, and has ``edges_sampled``).
        batch_size: seed nodes per mini-batch (default 1024; only with ``num_neighbors``).

    Returns:
        a :class:`Ticket`.

    Raises:
        ValueError: ``data`` lacks a needed attribute, a rate is outside (0, 1), or
            rounds / epochs < 1, or ``weights`` is given with ``structured=True``, or
            ``batch_size`` without ``num_neighbors``, or ``num_neighbors`` with ``structured=True``.
        ModelError: the edge mask cannot reach the model by ``edge_route``, or does not change
            its output, or ``weights`` names no parameter of the model; with ``structured=True``:
            structprune cannot trace the model, finds no prunable channel unit, or zeroing a
            unit's parameter slices does not equal removing it.
    """
    if num_neighbors is not None or batch_size is not None:
        if num_neighbors is None:
            raise ValueError("find_ticket: batch_size is for mini-batch training; also pass num_neighbors=[...] "
                             "(e.g. [15, 10]), or drop batch_size for full-batch training")
        if structured:
            raise ValueError("find_ticket: structured=True has no mini-batch version yet; drop num_neighbors / "
                             "batch_size (full-batch), or structured=True")
        if on_round is not None:
            raise ValueError("find_ticket: on_round has no mini-batch version yet; drop num_neighbors / "
                             "batch_size (full-batch), or on_round")
        from . import minibatch

        return minibatch.find_ticket(
            model, data, num_neighbors=num_neighbors, batch_size=1024 if batch_size is None else batch_size,
            rounds=rounds, graph_rate=graph_rate, weight_rate=weight_rate, epochs=epochs, lr=lr,
            weight_decay=weight_decay, s1=s1, s2=s2, seed=seed, progress=progress, edge_route=edge_route,
            weights=weights, noise=noise)
    _check(data, rounds, graph_rate, weight_rate, epochs)
    if structured and weights is not None:
        raise ValueError("find_ticket(structured=True): weights= names parameters for per-weight masks; a "
                         "structured search masks the channel units structprune finds (drop weights=, or "
                         "use structured=False)")
    route = _masks.resolve_route(model, edge_route)
    x, ei = data.x, data.edge_index
    num_edges = ei.size(1)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _check_mask_reaches(model, x, ei, route, dtype)
    # The weight side: per-weight masks ({parameter: bool}) or per-unit masks ({group id: bool}).
    units = _masks.ChannelUnits(model, x, ei) if structured else None
    if units is None:
        named = dict(model.named_parameters())
        alive_w = {n: torch.ones_like(named[n], dtype=torch.bool) for n in _masks.weight_names(model, weights)}
    else:
        alive_w = units.ones(ei.device)

    alive_g = torch.ones(num_edges, dtype=torch.bool, device=ei.device)
    history: list[dict] = []
    state, pruned = theta0, None
    outer = _bar(rounds, "UGS rounds", progress)
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        m_g, m_w = _search_masks(model, data, route, theta0, alive_g, alive_w, epochs, lr, weight_decay,
                                 s1, s2, seed, noise, dtype, progress, units)
        alive_g = _masks.prune_lowest(m_g, alive_g, graph_rate)
        alive_w = _prune_weight_side(m_w, alive_w, weight_rate, units)
        fixed = alive_w if units is None else units.weight_masks(alive_w, "gates")
        val, test, state = train_ticket(model, data, alive_g, fixed, theta0, epochs, lr, weight_decay, seed,
                                        progress)
        model.load_state_dict(state)
        row = {"round": r, "graph_sparsity": 1.0 - int(alive_g.sum()) / num_edges, "edges_kept": int(alive_g.sum())}
        if units is None:
            row.update(_weights_row(model, alive_w, x, ei[:, alive_g]))
        else:
            pruned = units.apply(alive_w)  # the physically smaller model, with this round's weights
            row.update(_channels_row(units, pruned, alive_w, x, ei[:, alive_g]))
        history.append({**row, "val_acc": val, "test_acc": test, "seconds": time.perf_counter() - start})
        outer.set_postfix(test=f"{test:.3f}", graph=f"{row['graph_sparsity']:.3f}",
                          weights=f"{row['weight_sparsity']:.3f}")
        outer.update()
        if on_round is not None:
            on_round(_ticket(model, state, pruned, units, data, alive_g, alive_w, list(history), theta0))
    outer.close()

    ticket = _ticket(model, state, pruned, units, data, alive_g, alive_w, history, theta0)
    model.load_state_dict(theta0)
    return ticket


def _ticket(model, state, pruned, units, data, alive_g, alive_w, history, theta0) -> Ticket:
    """The Ticket after a round: a copy of ``model`` at ``state`` (per-weight masks) or the
    physically pruned model ``pruned`` (channel units)."""
    if units is None:
        ticket_model = copy.deepcopy(model)
        ticket_model.load_state_dict(state)
        ticket_model.eval()
        weight_masks, channel_masks = {n: m.clone() for n, m in alive_w.items()}, None
    else:
        ticket_model, weight_masks, channel_masks = pruned, units.weight_masks(alive_w), dict(alive_w)
    return Ticket(ticket_model, prune_edges(data, alive_g), alive_g.clone(), weight_masks, history, theta0,
                  channel_masks)


def _prune_weight_side(m_w: dict, alive_w: dict, rate: float, units) -> dict:
    """Prune ``int(n·rate) + 1`` of the ``n`` kept weights (ranked globally over all masked
    parameters) or, with ``units``, of the kept channel units (globally over all groups)."""
    if units is not None:
        return _masks.prune_lowest_units(m_w, alive_w, rate)
    names = list(alive_w)
    flat = _masks.prune_lowest(torch.cat([m_w[n].flatten() for n in names]),
                               torch.cat([alive_w[n].flatten() for n in names]), rate)
    return {n: f.view_as(alive_w[n]) for n, f in zip(names, flat.split([alive_w[n].numel() for n in names]))}


def _weights_row(model: nn.Module, alive_w: dict[str, Tensor], x: Tensor | None = None,
                 kept_ei: Tensor | None = None) -> dict:
    """A history row's weight side; MACs on ``(x, kept_ei)`` when given."""
    total = sum(m.numel() for m in alive_w.values())
    kept = int(sum(int(m.sum()) for m in alive_w.values()))
    row = {"weight_sparsity": 1.0 - kept / total, "weights_kept": kept}
    if x is not None:
        row["macs"] = _masks.count_macs(model, x, kept_ei)
    return row


def _channels_row(units: "_masks.ChannelUnits", pruned: nn.Module, alive: dict[int, Tensor], x: Tensor,
                  kept_ei: Tensor) -> dict:
    total = sum(p.numel() for p in units.model.parameters())
    kept_w = sum(p.numel() for p in pruned.parameters())
    kept_c = int(sum(int(a.sum()) for a in alive.values()))
    dense = _masks.count_dense_macs(pruned, x, kept_ei)
    messages = _masks.count_message_macs(pruned, x, kept_ei)
    return {"weight_sparsity": 1.0 - kept_w / total, "weights_kept": kept_w,
            "channel_sparsity": 1.0 - kept_c / units.total, "channels_kept": kept_c,
            "macs": dense + messages, "macs_dense": dense, "macs_messages": messages}


def _check_mask_reaches(model: nn.Module, x: Tensor, ei: Tensor, route: str, dtype) -> None:
    """Refuse a model whose output does not depend on the edge mask passed by ``route``."""
    mask = torch.ones(ei.size(1), dtype=dtype, device=ei.device, requires_grad=True)
    was = model.training
    model.eval()
    try:
        out = _masks.forward(model, x, ei, route, mask)
        (grad,) = torch.autograd.grad(out.float().square().sum(), mask, allow_unused=True)
    finally:
        model.train(was)
    if ei.size(1) and (grad is None or not bool(grad.abs().sum() > 0)):
        how = ("it takes edge_weight but its output does not depend on it: pass edge_weight on to "
               "the convolutions, or use edge_route='explain'" if route == "edge_weight" else
               "PyG's explain hooks did not reach its messages: give it an edge_weight argument "
               "(edge_route='edge_weight')")
        raise ModelError(f"find_ticket(edge_route={route!r}): the edge mask does not reach {type(model).__name__}; "
                         f"{how}")


def _search_masks(model, data, route, theta0, alive_g, alive_w, epochs, lr, weight_decay, s1, s2, seed,
                  noise, dtype, progress, units=None) -> tuple[Tensor, dict]:
    """UGS's mask stage (``run_get_mask``): returns the soft masks at the best validation epoch.

    ``alive_w`` is ``{parameter name: bool}`` (one mask entry per weight) or, with ``units`` (a
    :class:`~structprune.gnn.masks.ChannelUnits`), ``{group id: bool}`` (one per channel unit)."""
    torch.manual_seed(seed)
    model.load_state_dict(theta0)
    named = dict(model.named_parameters())
    x, ei, y = data.x, data.edge_index, data.y

    def soft(alive: Tensor, like_dtype) -> Tensor:
        binary = alive.to(like_dtype)
        m = binary + (2 * torch.rand(binary.shape, dtype=like_dtype, device=binary.device) - 1) * noise * binary
        return m.requires_grad_(True)

    def w_dtype(key):
        return dtype if units is not None else named[key].dtype

    fixed_g = alive_g.to(dtype)
    fixed_w = {n: a.to(w_dtype(n)) for n, a in alive_w.items()}
    m_g = soft(alive_g, dtype)
    m_w = {n: soft(a, w_dtype(n)) for n, a in alive_w.items()}

    def masked_params() -> dict[str, Tensor]:
        if units is not None:
            return units.gated(named, {g: m_w[g] * fixed_w[g] for g in m_w})
        return {n: named[n] * m_w[n] * fixed_w[n] for n in m_w}

    opt = torch.optim.Adam(list(model.parameters()) + [m_g] + list(m_w.values()), lr=lr,
                           weight_decay=weight_decay)
    best_val, best = -1.0, None
    bar = _bar(epochs, "  masks", progress, leave=False)
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        out = _masks.forward(model, x, ei, route, m_g * fixed_g, masked_params())
        F.cross_entropy(out[data.train_mask], y[data.train_mask]).backward()
        with torch.no_grad():
            for m, scale in [(m_g, s1)] + [(m, s2) for m in m_w.values()]:
                if m.grad is None:
                    m.grad = torch.zeros_like(m)
                m.grad.add_(scale * torch.sign(m))
        opt.step()
        model.eval()
        with torch.no_grad():
            out = _masks.forward(model, x, ei, route, m_g * fixed_g, masked_params())
        val = _accuracy(out, y, data.val_mask)
        if val > best_val:
            best_val = val
            best = (m_g.detach().clone(), {n: m.detach().clone() for n, m in m_w.items()})
        bar.update()
    bar.close()
    return best
