"""Graph nodes and edges as prunable units: the relation at the graph level.

Channel pruning (:mod:`structprune.graph.depgraph`) freezes every model input and every row that
index *values* address. Here the same records are read again with the graph's node and edge
dims opened: the node dim of ``x`` (and of every other per-node input), the edge dim of
``edge_index`` (and of ``edge_weight`` / ``edge_attr``) become units, and so does everything
they reach through ops that treat rows one by one (a ``Linear``, an activation, a gathered
message, a scatter's result).

- **Two-way** records (``Couple``) are the same as for channels, plus each rule's
  :meth:`~structprune.rules.OpRule.graph_couple` (a gather's result row k is index entry k; a
  scatter's source entry i is index entry i; ``arange(x.size(0))`` entry i is node i).
- **One-way** records: :class:`~structprune.rules.Address` (rows picked by index values). They
  freeze channels; here they only say that the index refers to those rows. Dropping node v drops
  every edge naming v; the relation never merges nodes through their edges (a union-find would).
- What still freezes a node or edge unit is a real reason to refuse: a mean or a batch
  statistic over nodes, a node count used as a value, an op without a rule.

:func:`graph_units` answers, for one traced model: can nodes / edges be dropped exactly, why not,
and which parameter dims follow them (a per-node embedding table is sliced with the nodes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.fx as fx

from ..rules import (Address, Choice, Couple, CoupleContext, Freeze, Record, SizeValue, Space,
                     describe, lookup, op_name)
from .depgraph import INPUT_REASON, OUTPUT_REASON
from .coupling import SpaceTable, _components, _edges, solve
from .shapes import placeholder_values

#: Size-value consumers that only check a size: a guard raises on a graph it does not accept.
_CHECKS = ("_assert", "_assert_scalar", "sym_constrain_range_for_size", "_check_is_size",
           "arange")


@dataclass
class GraphUnits:
    """What dropping graph nodes and edges does to one traced model.

    Attributes:
        nodes: ``{input name: dim}`` of the per-node inputs that were opened.
        edges: ``{input name: dim}`` of the per-edge inputs that were opened.
        node_reason / edge_reason: why dropping nodes / edges would not be exact (the op and
            what it does), or None when it is.
        node_params / edge_params: parameter (or buffer) dims whose rows are the graph's nodes
            / edges, index for index: they are sliced with them.
    """

    nodes: dict[str, int]
    edges: dict[str, int]
    node_reason: Optional[str] = None
    edge_reason: Optional[str] = None
    node_params: list[Space] = field(default_factory=list)
    edge_params: list[Space] = field(default_factory=list)

    @property
    def nodes_exact(self) -> bool:
        return self.node_reason is None

    @property
    def edges_exact(self) -> bool:
        return self.edge_reason is None


def _example_values(graph: Any) -> dict[str, Any]:
    """Every non-float value of one example run (bool masks, index tensors, ints), by node name."""
    out: dict[str, Any] = dict(graph.values)

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            v = super().run_node(n)
            if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
                out[n.name] = v
            return v

    try:
        with torch.no_grad():
            Recorder(graph.graph_module).run(*_flat_inputs(graph))
    except Exception:  # values are a refinement (bool masks); the relation stands without them
        pass
    return out


def _flat_inputs(graph: Any) -> list[Any]:
    return placeholder_values(graph.graph_module, graph.args, graph.kwargs)


def _id_extreme(n: fx.Node, values: dict[str, Any]) -> bool:
    """``batch.max()``: the largest of integer ids (how PyG counts the graphs of a batch). It is
    the same on the kept rows unless every row with that id goes, which the graph-unit oracle
    (:func:`structprune.gnn.graph_oracle_diff`) catches as a shape mismatch."""
    if n.op not in ("call_function", "call_method") or op_name(n.target) not in (
            "max", "amax", "min", "amin") or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    v = values.get(n.args[0].name)
    return isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex() \
        and v.dtype != torch.bool


def _kept_record(r: Record, opened: set[Space], checks: set[str]) -> bool:
    """Whether a channel-level record still holds for graph units: addressing is one-way here,
    guards only check sizes, opened inputs and every output's rows are free."""
    if isinstance(r, Address):
        return False
    if isinstance(r, SizeValue) and r.consumer in checks:
        return False
    if isinstance(r, Freeze) and r.reason in (INPUT_REASON, OUTPUT_REASON):
        return r.space not in opened and r.reason == INPUT_REASON
    if isinstance(r, Freeze) and r.space in opened and not r.reason:
        return False  # "not mentioned" by a rule that reads the input's rows one by one
    return True


def graph_units(graph: Any, nodes: Mapping[str, int], edges: Mapping[str, int]) -> GraphUnits:
    """Solve the relation of ``graph`` (a :class:`~structprune.graph.depgraph.DependencyGraph`)
    with the node dims ``nodes`` and edge dims ``edges`` (``{placeholder name: dim}``) opened.

    Raises:
        KeyError: a name is not an input of the traced graph.
    """
    gm = graph.graph_module
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    opened: dict[Space, str] = {}
    for kind, spec in (("node", nodes), ("edge", edges)):
        for name, dim in spec.items():
            if name not in placeholders:
                raise KeyError(f"{name!r} is not an input of the traced model "
                               f"(inputs: {', '.join(placeholders)})")
            if not isinstance(graph.shapes.get(name), torch.Size):
                continue  # an input passed as None
            space = Space.model_input(name, dim % max(len(graph.shapes[name]), 1))
            opened[space] = kind
    checks = {n.name for n in gm.graph.nodes
              if n.op in ("call_function", "call_method") and op_name(n.target) in _CHECKS}
    open_set = set(opened)
    values = _example_values(graph)
    tuples = graph._tuple_shapes
    records: list[Record] = []
    origin: dict[int, str] = {}  # id(record) -> the node whose rule made it
    for n in gm.graph.nodes:
        extra: list[Record] = []
        if n.op in ("call_function", "call_method", "call_module"):
            module = graph.modules.get(str(n.target)) if n.op == "call_module" else None
            rule = graph.node_rules.get(n.name) or lookup(n, module, graph.rules)
            ctx = CoupleContext(n, module, graph.shapes, values,
                                str(n.target) if n.op == "call_module" else None, tuples)
            try:
                extra = list(rule.graph_couple(ctx))
            except Exception:  # a rule that cannot read this call adds nothing
                extra = []
        mentioned = {s for r in extra if isinstance(r, Couple) for s in (r.a, r.b)}
        start, end = graph.record_spans.get(n.name, (0, 0))
        for r in graph.records[start:end]:
            if not _kept_record(r, open_set, checks):
                continue
            if isinstance(r, Freeze) and not r.reason and r.space in mentioned:
                continue  # left unmentioned for channels, mapped row by row here
            if isinstance(r, Freeze) and _id_extreme(n, values):
                continue
            records.append(Choice(list(r.options), r.chosen) if isinstance(r, Choice) else r)
            origin[id(records[-1])] = n.name
        records += extra
    spanned = sum(e - s for s, e in graph.record_spans.values())
    records += [r for r in graph.records[spanned:] if _kept_record(r, open_set, checks)]
    table = SpaceTable()
    for s in graph.table.order:
        table.add(s, graph.table.size[s])
    solve(table, records)  # resolves the choices (reshapes) against the graph-level freezes
    couples = [r for r in records if isinstance(r, Couple)]
    for r in records:
        if isinstance(r, Choice):
            couples += [x for x in r.options[r.chosen][1] if isinstance(x, Couple)]
    a, b = _edges(table, couples, {})
    label, _ = _components(table.total, a, b)

    def labels(space: Space, idx: Any = None) -> np.ndarray:
        if space not in table or table.size[space] == 0:
            return np.zeros(0, np.int64)
        return label[table.ids(space, idx)]

    kind_of: dict[int, str] = {}
    for space, kind in opened.items():
        for lab in labels(space):
            kind_of.setdefault(int(lab), kind)
    for r in graph.records:  # rows that index values address: nodes (or graphs) by default
        if isinstance(r, Address):
            for lab in labels(r.space):
                kind_of.setdefault(int(lab), "node")
    out = GraphUnits(dict(nodes), dict(edges))
    reasons: dict[str, str] = {}
    for r in records:
        if not isinstance(r, Freeze) or (r.idx is not None and np.size(r.idx) == 0):
            continue
        hit = {kind_of[int(x)] for x in labels(r.space, r.idx) if int(x) in kind_of}
        for kind in hit:
            reasons.setdefault(kind, _explain(graph, r, origin.get(id(r))))
    out.node_reason, out.edge_reason = reasons.get("node"), reasons.get("edge")
    for space in table.order:
        if not space.is_param:
            continue
        for kind, params in (("node", out.node_params), ("edge", out.edge_params)):
            ref = [s for s, k in opened.items() if k == kind]
            if any(table.size[space] == table.size[s] and np.array_equal(labels(space), labels(s))
                   for s in ref):
                params.append(space)
    return out


def _explain(graph: Any, r: Freeze, origin: Optional[str]) -> str:
    """A freeze as a user reads it: the op that made it and why."""
    what = str(r.space)
    if origin is not None:
        node = graph.node(origin)
        what = f"{describe(node)} (%{origin})" if node.op != "placeholder" else f"input {origin}"
    return f"{what}: {r.reason or f'no rule maps dim {r.space.dim} of %{r.space.node} row by row'}"
