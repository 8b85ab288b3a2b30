"""Soft edge masks and weight masks for graph lottery tickets, on sparse edge lists.

Two ways to put one trainable scalar on every directed edge of ``data.edge_index`` (no N x N
matrix anywhere):

- ``"edge_weight"``: the mask is passed as the model's ``edge_weight`` argument, so the model's
  own normalisation sees the masked adjacency. This is the faithful route for UGS's GCN
  (``models/gnn_ugs.py``: ``D (A ⊙ m + I)^T D`` with the degree taken over each edge's source,
  self-loops of weight 1 appended *after* masking, so they are never masked) and for PyG's
  ``GCNConv`` / ``GraphConv``. PyG's ``gcn_norm`` differs from the official code in two places:
  it takes the degree over each edge's *target* (the official row sums are over the *source*; the
  two agree only for a symmetric mask), and ``add_remaining_self_loops`` keeps a self-loop already
  in the graph with its masked weight instead of adding a second, unmasked one.
- ``"explain"``: PyG's explain hooks (``set_masks(..., apply_sigmoid=False)``) multiply the
  messages of every ``MessagePassing`` layer by the mask. The self-loops a layer adds itself get
  weight 1 (``MessagePassing.explain_message``). This works for layers without ``edge_weight``
  (GAT, GIN, SAGE), but it masks messages *after* the layer's normalisation: a GCNConv's degrees,
  a mean's denominator and an attention softmax still count a masked edge (as the official GIN
  does for its mean; the official GAT masks the attention *logit* instead, see ALGORITHMS.md §2.5).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import ModelError

ROUTES = ("auto", "edge_weight", "explain")


def _message_passing_layers(model: nn.Module) -> list[nn.Module]:
    from torch_geometric.nn.conv import MessagePassing

    return [m for m in model.modules() if isinstance(m, MessagePassing)]


def takes_edge_weight(model: nn.Module) -> bool:
    """Whether ``model.forward`` has an ``edge_weight`` parameter (or ``**kwargs``)."""
    params = inspect.signature(model.forward).parameters
    return "edge_weight" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def resolve_route(model: nn.Module, route: str) -> str:
    """The edge-mask route for ``model``: ``"auto"`` takes ``"edge_weight"`` when
    ``model.forward`` accepts ``edge_weight``, else ``"explain"``."""
    name = type(model).__name__
    if route not in ROUTES:
        raise ValueError(f"find_ticket: edge_route must be one of {ROUTES}, got {route!r}")
    if route == "auto":
        route = "edge_weight" if takes_edge_weight(model) else "explain"
    if route == "edge_weight" and not takes_edge_weight(model):
        raise ModelError(
            f"find_ticket(edge_route='edge_weight'): {name}.forward takes no edge_weight argument, "
            f"so the edge mask cannot reach it; add an edge_weight argument that scales each edge's "
            f"message (and pass it to the convolutions), or use edge_route='explain' to mask the "
            f"messages of every MessagePassing layer"
        )
    if route == "explain" and not _message_passing_layers(model):
        raise ModelError(
            f"find_ticket(edge_route='explain'): {name} has no torch_geometric MessagePassing layer "
            f"whose messages the edge mask could multiply; give the model an edge_weight argument "
            f"(edge_route='edge_weight') or build it from PyG convolutions"
        )
    return route


@contextlib.contextmanager
def explain_masks(model: nn.Module, mask: Tensor, edge_index: Tensor) -> Iterator[None]:
    """Multiply every MessagePassing layer's messages by ``mask`` (one value per column of
    ``edge_index``) inside the ``with`` block; the layers' own self-loops get weight 1."""
    from torch_geometric.explain.algorithm.utils import clear_masks, set_masks

    set_masks(model, mask, edge_index, apply_sigmoid=False)
    try:
        yield
    finally:
        clear_masks(model)


def forward(
    model: nn.Module,
    x: Tensor,
    edge_index: Tensor,
    route: str,
    edge_mask: Tensor | None = None,
    params: dict[str, Tensor] | None = None,
) -> Tensor:
    """``model(x, edge_index)`` with the soft edge mask ``edge_mask`` applied by ``route`` and the
    parameters in ``params`` (masked weights) substituted for the model's own."""
    call = (lambda *a, **k: torch.func.functional_call(model, params, a, k)) if params else model
    if edge_mask is None:
        return call(x, edge_index)
    if route == "edge_weight":
        return call(x, edge_index, edge_weight=edge_mask)
    with explain_masks(model, edge_mask, edge_index):
        return call(x, edge_index)


def weight_names(model: nn.Module, weights: list[str] | None) -> list[str]:
    """The parameters that get a weight mask: ``weights`` if given (checked), else every
    parameter with two or more dims (weight matrices, kernels, attention vectors; not biases)."""
    named = dict(model.named_parameters())
    if weights is None:
        names = [n for n, p in named.items() if p.dim() >= 2]
        if not names:
            raise ModelError(
                f"find_ticket: {type(model).__name__} has no parameter with 2 or more dims to mask; "
                f"name the parameters to prune with weights=[...]"
            )
        return names
    unknown = [n for n in weights if n not in named]
    if unknown:
        raise ModelError(
            f"find_ticket(weights=...): {type(model).__name__} has no parameter {unknown[0]!r}; "
            f"use names from model.named_parameters()"
        )
    return list(weights)


def prune_lowest(scores: Tensor, alive: Tensor, rate: float) -> Tensor:
    """Drop the ``int(n * rate) + 1`` entries of smallest ``|scores|`` among the ``n`` alive ones.

    The official code (``pruning.get_final_mask_epoch``) keeps ``|m| > sorted(|m|)[int(n*rate)]``,
    which drops ``int(n*rate) + 1`` entries when there are no ties; here ties are broken by
    position, so the count is always exactly that. Returns the new ``alive`` (bool).
    """
    idx = alive.nonzero().squeeze(1)
    n = idx.numel()
    if n == 0:
        return alive.clone()
    k = min(int(n * rate) + 1, n)
    order = torch.sort(scores.detach()[idx].abs(), stable=True).indices
    new = alive.clone()
    new[idx[order[:k]]] = False
    return new


def count_macs(model: nn.Module, x: Tensor, edge_index: Tensor) -> int:
    """Multiply-accumulates of one forward of ``model(x, edge_index)`` as it runs: every
    ``nn.Linear`` / PyG ``Linear`` counts ``nnz(weight) * rows``, every other parameter of two or
    more dims ``nnz * num_nodes`` once per call of its module, and every MessagePassing layer its
    messages' size (edges incl. self-loops x width). Pruned weights must be zero in ``model``."""
    from torch_geometric.nn.dense.linear import Linear as PygLinear

    total = [0]
    handles = []
    num_nodes = x.size(0)

    def linear_hook(module, inputs, output):
        inp = inputs[0]
        rows = inp.numel() // max(inp.shape[-1], 1)
        total[0] += int(torch.count_nonzero(module.weight)) * rows

    def other_hook(module, inputs, output):
        for p in module.parameters(recurse=False):
            if p.dim() >= 2:
                total[0] += int(torch.count_nonzero(p)) * num_nodes

    def message_hook(module, inputs, output):
        total[0] += output.numel()

    for module in model.modules():
        if isinstance(module, (nn.Linear, PygLinear)):
            handles.append(module.register_forward_hook(linear_hook))
        elif any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(other_hook))
    for layer in _message_passing_layers(model):
        handles.append(layer.register_message_forward_hook(message_hook))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x, edge_index)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return total[0]


# --- structured tickets: one mask per coupled channel unit ------------------------------------


class ChannelUnits:
    """The coupled channel units of ``model`` as structprune's engine finds them, with one mask
    entry per unit (``find_ticket(structured=True)``).

    ``sp.trace(model, (x, edge_index))`` (in eval mode) gives the groups; every unit of every
    group gets one mask entry (a frozen dim is in no group, so it gets none). A unit's mask
    multiplies the parameter slices that *produce* the unit (every parameter member of its group
    except the ``"in"`` ones, which read it: a Linear's output rows and bias, a norm's scale and
    shift, GAT's attention vectors) along the member's dim; where zeroing those is not exact (a
    channel that is nonzero without its parameters, e.g. ``sigmoid(0)``), it multiplies every
    parameter member, reading ones included. Which is exact is checked once, on ``(x,
    edge_index)`` with every other unit dropped, against the physically pruned model (the
    engine's ``Plan`` applied): zeroing the mask of a set of units must give the output of the
    model with those units removed, else :class:`~structprune.errors.ModelError`.

    Attributes:
        pruner: the :class:`structprune.Pruner` whose graph holds the groups (its model is the
            model given, traced on θ0; loading a state dict into the model updates the graph).
        groups: ``{group id: number of units}``.
        gates: ``{parameter name: [(dim, index, group id, unit), ...]}``, the slices a soft mask
            multiplies during the mask search.
        members: the same for every parameter member (what a removed unit takes away).
        gate_roles: ``"producers"`` or ``"all members"`` (which set the check found exact).
    """

    def __init__(self, model: nn.Module, x: Tensor, edge_index: Tensor, tol: float = 1e-4) -> None:
        from .. import Pruner
        from ..errors import StructpruneError
        from ..modes import eval_mode

        name = type(model).__name__
        with eval_mode(model):
            try:
                self.pruner = Pruner(model, (x, edge_index))
                graph = self.pruner.graph
            except StructpruneError as exc:
                first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                raise ModelError(
                    f"find_ticket(structured=True): structprune cannot trace {name} on (data.x, "
                    f"data.edge_index) to find its channel units ({type(exc).__name__}: {first}); "
                    f"use structured=False (one mask per weight), or make the model traceable"
                ) from exc
        self.model = model
        self.x, self.edge_index = x, edge_index
        named = dict(model.named_parameters())
        self.groups = {g.id: g.num_units for g in graph.groups() if g.num_units > 1 and _channel_level(g)}
        self.gates: dict[str, list] = {}
        self.members: dict[str, list] = {}
        for g in graph.groups():
            if g.id not in self.groups:
                continue
            for m in g.params:
                if m.qualname not in named:  # a buffer (running statistics) or a lifted constant
                    continue
                entry = (m.dim, m.index, g.id, m.unit)
                self.members.setdefault(m.qualname, []).append(entry)
                if m.role != "in":
                    self.gates.setdefault(m.qualname, []).append(entry)
        if not self.members:
            frozen = "; ".join(f"{e.node}: {e.reason}" for e in graph.frozen()[:2])
            raise ModelError(
                f"find_ticket(structured=True): {name} has no prunable channel unit (structprune "
                f"found no group with 2 or more units whose parameters it could slice; "
                f"{frozen or 'every dim is tied to the inputs or outputs'}); use structured=False"
            )
        self.gate_roles = self._check_exact(tol)

    @property
    def total(self) -> int:
        """Channel units over all groups."""
        return sum(self.groups.values())

    def ones(self, device=None) -> dict[int, Tensor]:
        """Every unit kept: ``{group id: bool tensor of ones}``."""
        return {g: torch.ones(n, dtype=torch.bool, device=device) for g, n in self.groups.items()}

    def gated(self, named: dict[str, Tensor], unit_masks: dict[int, Tensor],
              which: str | None = None) -> dict[str, Tensor]:
        """``{parameter name: parameter ⊙ its units' masks}`` for every gated parameter; a unit's
        mask value multiplies its slices (``which``: ``"producers"`` or ``"all members"``;
        default: the exact set the check chose)."""
        table = self.gates if (which or self.gate_roles) == "producers" else self.members
        out = {}
        for pname, entries in table.items():
            p = named[pname]
            for dim, index, gid, unit in entries:
                mask = unit_masks[gid].to(p.dtype)
                factor = torch.ones(p.shape[dim], dtype=p.dtype, device=p.device)
                factor = factor.index_copy(0, index.to(p.device), mask[unit.to(mask.device)])
                shape = [1] * p.dim()
                shape[dim] = -1
                p = p * factor.view(shape)
            out[pname] = p
        return out

    def weight_masks(self, alive: dict[int, Tensor], which: str = "all members") -> dict[str, Tensor]:
        """``{parameter name: bool}``: True where the entry survives physical pruning of the
        units ``alive`` marks False. ``which="all members"``: over every parameter of the model;
        ``"gates"``: only the parameters and slices the soft masks scale (the exact set the
        check chose), for the fixed-mask training."""
        out = {}
        table = self.members if which == "all members" else (
            self.gates if self.gate_roles == "producers" else self.members)
        params = self.model.named_parameters() if which == "all members" else (
            (n, p) for n, p in self.model.named_parameters() if n in table)
        for pname, p in params:
            keep = torch.ones(p.shape, dtype=torch.bool, device=p.device)
            for dim, index, gid, unit in table.get(pname, ()):
                gone = index[~alive[gid][unit.to(alive[gid].device)].cpu()]
                if gone.numel():
                    keep.index_fill_(dim, gone.to(p.device), False)
            out[pname] = keep
        return out

    def plan(self, alive: dict[int, Tensor]):
        """The engine's :class:`~structprune.Plan` that removes the units ``alive`` marks False."""
        from ..plan import Plan

        drops = {g: (~a).nonzero().flatten().cpu() for g, a in alive.items() if not bool(a.all())}
        return Plan(self.pruner.graph, drops)

    def apply(self, alive: dict[int, Tensor]) -> nn.Module:
        """The physically smaller model (the engine's plan applied to the model's *current*
        weights), in eval mode."""
        from ..modes import eval_mode

        with eval_mode(self.model):
            pruned = self.pruner.apply(self.plan(alive))
        return pruned.eval()

    def _check_exact(self, tol: float) -> str:
        """Which parameter slices to scale so that a zero mask equals removing the unit:
        ``"producers"`` if zeroing those reproduces the physically pruned model, else ``"all
        members"`` if zeroing every member does; otherwise refuse."""
        from ..oracle import max_rel_diff

        alive = {g: torch.arange(n) % 2 == 0 for g, n in self.groups.items()}  # drop every other
        pruned = self.apply(alive)
        named = dict(self.model.named_parameters())
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                want = pruned(self.x, self.edge_index)
                diffs = {}
                for which in ("producers", "all members"):
                    got = forward(self.model, self.x, self.edge_index, "edge_weight", None,
                                  self.gated(named, alive, which))
                    diffs[which] = max_rel_diff(got, want)
                    if diffs[which] <= tol:
                        return which
        finally:
            self.model.train(was)
        raise ModelError(
            f"find_ticket(structured=True): in {type(self.model).__name__}, zeroing the parameter "
            f"slices of removed channel units does not reproduce the model with those units "
            f"removed (largest relative difference {min(diffs.values()):.2e} > {tol:g}), so a "
            f"channel mask of 0 would not mean 'removed'; use structured=False"
        )


def _channel_level(group) -> bool:
    """Whether every member of ``group`` is a channel dim (not a graph's node or edge dim)."""
    from ..rules import Level

    return all(getattr(m.space, "level", Level.CHANNEL) == Level.CHANNEL for m in group.members)


def prune_lowest_units(scores: dict[int, Tensor], alive: dict[int, Tensor], rate: float) -> dict[int, Tensor]:
    """Drop the ``int(n * rate) + 1`` channel units of smallest ``|score|`` among the ``n`` kept
    ones, ranked globally over all groups (as UGS ranks its weights); ties by position (group
    order, then unit). Every group keeps at least one unit: its largest-``|score|`` unit is never
    a candidate, so when the count would empty a group the next smallest elsewhere goes instead
    (and when only one unit per group is left, fewer are dropped). Returns the new ``alive``."""
    gids = list(alive)
    flat_alive = torch.cat([alive[g] for g in gids])
    flat_scores = torch.cat([scores[g].detach().abs().to(torch.float64) for g in gids])
    protected = torch.zeros_like(flat_alive)
    start = 0
    for g in gids:
        a = alive[g]
        idx = a.nonzero().flatten()
        if idx.numel():
            best = idx[torch.argmax(flat_scores[start:start + a.numel()][idx])]
            protected[start + best] = True
        start += a.numel()
    n = int(flat_alive.sum())
    k = int(n * rate) + 1
    candidates = (flat_alive & ~protected).nonzero().flatten()
    k = min(k, candidates.numel())
    order = torch.sort(flat_scores[candidates], stable=True).indices
    new = flat_alive.clone()
    new[candidates[order[:k]]] = False
    return dict(zip(gids, new.split([alive[g].numel() for g in gids])))


_MESSAGE_OPS = ("scatter_add", "scatter_add_", "index_add", "index_add_", "scatter_reduce", "scatter_reduce_",
                "index_reduce", "index_reduce_")


def count_message_macs(model: nn.Module, x: Tensor, edge_index: Tensor) -> int:
    """Multiply-accumulates of the message aggregations of one ``model(x, edge_index)`` as it
    runs, on any model (a PyG module or a pruned ``fx.GraphModule`` of ATen ops alike): every
    ``scatter_add`` / ``index_add`` / ``scatter_reduce`` / ``index_reduce`` whose source has two
    or more dims (messages ``[E, C]``, not a degree count ``[E]``) counts its source's size (edges
    incl. self-loops x width). Sparse-matrix products are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    total = [0]

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ in _MESSAGE_OPS:
                src = args[3] if len(args) > 3 else kwargs.get("src", kwargs.get("source"))
                if isinstance(src, Tensor) and src.dim() >= 2:
                    total[0] += src.numel()
            return func(*args, **kwargs)

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), _Count():
            model(x, edge_index)
    finally:
        model.train(was)
    return total[0]


def count_dense_macs(model: nn.Module, x: Tensor, edge_index: Tensor) -> int:
    """structprune's MAC counter (:func:`structprune.macs.count_macs`: rule formulas for linears,
    convs, norms; PyTorch's FLOP counter for the rest, which counts no scatter) on ``model``
    traced on ``(x, edge_index)``."""
    from .. import trace
    from ..macs import count_macs as engine_macs
    from ..modes import eval_mode

    with eval_mode(model):
        return int(engine_macs(trace(model, (x, edge_index))))
