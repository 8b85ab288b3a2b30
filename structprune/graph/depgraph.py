"""The dependency graph: trace -> spaces -> couplings -> components -> groups.

``trace(model, example_inputs)`` is the entry point. It captures the model, records shapes, asks
every node's rule for its couplings, freezes what no rule vouches for, solves the components in
one vectorised pass and builds the groups.
"""
from __future__ import annotations

import functools
import inspect
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..diagnostics import strict_enabled
from ..errors import PlanError, UnsupportedOpError
from ..rules import (Choice, Couple, CoupleContext, Freeze, Frozen, OpRule, Record, Role,
                     RuleKey, Space, describe, lookup, record_leaves, registry, tensor_shapes)
from .coupling import Solution, SpaceTable, _components, _edges, solve
from .group import Group, build_groups
from .inputs import capture_guarded, concrete_args
from .capture import ExampleInputs, check_model, has_forward_hooks, normalize_inputs
from .shapes import record_shapes
from .trace import Tracer


@dataclass(frozen=True)
class FrozenEntry:
    """A node whose tensors (or some dims of them) may not be pruned, and why.

    ``module`` is the innermost module the node runs in (its path; ``""`` at the top level or
    where the capture does not say); ``blocks`` whether the freeze holds back a dim that a
    parameter dim would otherwise be pruned with (False for harmless entries such as the
    ``arange`` that builds a causal mask).
    """

    node: str
    op: str
    reason: str
    module: str = field(default="", compare=False)
    blocks: bool = field(default=True, compare=False)

    def __repr__(self) -> str:
        where = f" in '{self.module}'" if self.module else ""
        return f"{self.node} ({self.op}{where}): {self.reason}"


#: Reasons of the freezes of the graph's inputs and outputs (graph units open them).
INPUT_REASON = "graph input"
OUTPUT_REASON = "graph output"


def _spaces_of(node: fx.Node, shape: Any) -> list[tuple[Space, int]]:
    """``(space, size)`` of every dim of ``node``'s tensor, or of each tensor inside its
    tuple/list/dict output, at any depth."""
    if isinstance(shape, torch.Size):
        return [(Space.of_node(node, d), n) for d, n in enumerate(shape)]
    return [(Space.item(node.name, path, d), n) for path, s in record_leaves(shape)
            for d, n in enumerate(s)]


def _mentioned(records: Iterable[Record]) -> set[Space]:
    out: set[Space] = set()
    for r in records:
        if isinstance(r, Couple):
            out.update((r.a, r.b))
        elif isinstance(r, Freeze):
            out.add(r.space)
        elif isinstance(r, Choice):
            for _, opt in r.options:
                out |= _mentioned(opt)
    return out


def _module_paths(n: fx.Node) -> set[str]:
    """Qualified names of the modules an exported node ran inside (from ``nn_module_stack``)."""
    stack = n.meta.get("nn_module_stack") or {}
    return {v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]}


def resolve_ignore(model: nn.Module, ignore: Iterable[nn.Module]) -> list[str]:
    """Qualified names of the ``ignore`` modules; each must be a submodule of ``model``."""
    by_id = {id(m): name for name, m in model.named_modules()}
    out = []
    for m in ignore:
        if not isinstance(m, nn.Module) or id(m) not in by_id:
            what = type(m).__name__ if isinstance(m, nn.Module) else repr(m)
            raise PlanError(f"ignore entry {what} is not a submodule of {type(model).__name__}; "
                            f"pass modules of the model being pruned (e.g. ignore=[model.fc])")
        out.append(by_id[id(m)])
    return out


@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """Whether a module class's code mentions ``training`` (so that its traced forward may
    depend on the mode); True where the source cannot be read."""
    plain = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Module, fx.GraphModule, object)
    for c in cls.__mro__:  # inherited code counts: a subclass may only define __init__
        if c in plain:
            continue
        try:
            if "training" in inspect.getsource(c):
                return True
        except (OSError, TypeError):
            return True
    return False


class DependencyGraph:
    """The coupled view of one model: spaces, units, groups and what is frozen.

    Attributes:
        model: the model that was traced (not copied).
        graph_module: the traced ``fx.GraphModule``; it shares the model's submodules (or, when
            the model was captured by ``torch.export``, its parameter and buffer tensors). Node
            names are stable: tracing the same model twice gives the same names. It generates
            its Python code lazily (``torch.fx``'s lazy GraphModule): calling it works, but for
            TorchScript make it plain first (``structprune.graph.modules.plain_module``).
        shapes: output shape of every tensor node (a list for tuple outputs).
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs,
                 rules: Optional[dict[RuleKey, OpRule]] = None, leaf_modules: Iterable[Any] = (),
                 ignore: Iterable[nn.Module] = (), head_channels: bool = False) -> None:
        check_model(model)
        self.model = model
        self.head_channels = head_channels
        self.rules = registry()
        self.rules.update(rules or {})
        self.args, self.kwargs = normalize_inputs(example_inputs)
        self.graph_module = capture_guarded(model, self.rules, leaf_modules, self.args,
                                            self.kwargs)
        self._leaf_modules = tuple(leaf_modules)
        self.shapes, self.values = record_shapes(self.graph_module, self.args, self.kwargs,
                                                 type(model).__name__)
        self.modules = dict(self.graph_module.named_modules())
        self._ignored = set(resolve_ignore(model, ignore))
        self.table = SpaceTable()
        self.node_rules: dict[str, OpRule] = {}
        self.records: list[Record] = []
        self.roles: dict[Space, str] = {}
        self._frozen: list[FrozenEntry] = []
        self._head_groups: Optional[set[int]] = None
        self._frozen_sorted: Optional[list[FrozenEntry]] = None
        self._build()
        self.solution: Solution = solve(self.table, self.records)
        self._groups = build_groups(self.table, self.solution, self.roles)
        #: The training flag the model had when traced (``forward`` may branch on it).
        self.traced_training = model.training
        #: Modules with parameters that only the other training mode's forward calls
        #: (GoogLeNet's auxiliary heads when traced in eval mode); this graph does not see them.
        self.other_mode_modules = self._other_mode_modules(leaf_modules)

    def _other_mode_modules(self, leaf_modules: Iterable[Any]) -> list[str]:
        if self.graph_module.meta.get("structprune_capture") == "export":
            return []
        model = self.model
        tracer = Tracer(self.rules, leaf_modules)
        if not any(_reads_training(type(m)) for path, m in model.named_modules()
                   if m is model or not tracer.is_leaf_module(m, path)):
            return []  # no code the trace runs looks at the mode: both modes trace alike
        flags = [(m, m.training) for m in model.modules()]
        try:
            model.train(not model.training)
            other = tracer.trace(
                model, concrete_args=concrete_args(model, self.args, self.kwargs) or None)
        except Exception:  # the other mode does not trace: nothing to compare
            return []
        finally:
            for m, flag in flags:
                m.training = flag

        def used(graph: fx.Graph) -> set[str]:
            out = set()
            for n in graph.nodes:
                if n.op == "call_module":
                    out.add(str(n.target))
                elif n.op == "get_attr":
                    out.add(str(n.target).rpartition(".")[0])
            return out

        here = used(self.graph_module.graph)
        covered = lambda p: any(p == h or p.startswith(h + ".") for h in here)  # noqa: E731
        touched = lambda p: any(h == p or h.startswith(p + ".") for h in here)  # noqa: E731
        out: list[str] = []
        for path in sorted(used(other) - here):
            if not path or covered(path):
                continue
            while "." in path and not touched(path.rpartition(".")[0]):
                path = path.rpartition(".")[0]  # the largest module this mode leaves out
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue
            if path not in out and any(True for _ in mod.parameters()):
                out.append(path)
        return out

    # --- construction --------------------------------------------------------------------------
    def _add_spaces(self) -> None:
        for n in self.graph_module.graph.nodes:
            for space, size in _spaces_of(n, self.shapes.get(n.name)):
                self.table.add(space, size)
        for name, t in list(self.graph_module.named_parameters()) + list(
                self.graph_module.named_buffers()):
            for d, size in enumerate(t.shape):
                self.table.add(Space.param(name, d), size)
        for n in self.graph_module.graph.nodes:  # tensor constants and plain tensor attributes
            if n.op == "get_attr" and isinstance(self.shapes.get(n.name), torch.Size):
                for d, size in enumerate(self.shapes[n.name]):
                    self.table.add(Space.param(str(n.target), d), size)

    def _node_spaces(self, n: fx.Node) -> list[Space]:
        return [s for s, _ in _spaces_of(n, self.shapes.get(n.name))]

    def _build(self) -> None:
        self._tuple_shapes = tensor_shapes(self.shapes)
        self._add_spaces()
        self._get_attr = {n.name: str(n.target) for n in self.graph_module.graph.nodes
                          if n.op == "get_attr"}
        mentioned_params: set[Space] = set()
        exported = self.graph_module.meta.get("structprune_capture") == "export"
        self.record_spans: dict[str, tuple[int, int]] = {}  # node -> its slice of records
        for n in self.graph_module.graph.nodes:
            recs = self._couple_node(n)
            if n.op == "call_module" and n.target in self._ignored:
                recs += [Freeze(s, "ignored by the user") for s in self._node_spaces(n)]
                self._frozen.append(FrozenEntry(n.name, describe(n), "ignored by the user"))
            elif exported and n.op == "call_function":
                recs += self._module_stack_freezes(n)
            mentioned = _mentioned(recs)
            mentioned_params |= {s for s in mentioned if s.is_param}
            self.record_spans[n.name] = (len(self.records), len(self.records) + len(recs))
            self.records += recs
        for s in self.table.order:
            if s.is_param and s not in mentioned_params:
                self.records.append(Freeze(s, "no rule couples this parameter dim"))

    def _module_stack_freezes(self, n: fx.Node) -> list[Record]:
        """``ignore=`` and ``leaf_modules=`` on an exported graph, whose nodes are ATen ops that
        name the modules they ran in (``nn_module_stack``): an ignored module's outputs (its
        nodes read outside it) are frozen, and so is everything a leaf module computes."""
        paths = _module_paths(n)
        recs: list[Record] = []
        for path in paths & self._ignored:
            if any(path not in _module_paths(u) or u.op == "output" for u in n.users):
                recs += [Freeze(s, "ignored by the user") for s in self._node_spaces(n)]
                self._frozen.append(FrozenEntry(n.name, describe(n), "ignored by the user"))
                break
        if self._leaf_modules:
            for path in sorted(paths):
                try:
                    m = self.model.get_submodule(path)
                except AttributeError:
                    continue
                if any(m is leaf or (isinstance(leaf, type) and isinstance(m, leaf))
                       for leaf in self._leaf_modules):
                    reason = (f"inside leaf module '{path}' ({type(m).__name__}), which the "
                              f"exported graph does not keep whole")
                    spaces = self._node_spaces(n) + [s for a in n.all_input_nodes
                                                     for s in self._node_spaces(a)]
                    recs += [Freeze(s, reason) for s in spaces]
                    self._frozen.append(FrozenEntry(n.name, describe(n), reason))
                    break
        return recs

    def _couple_node(self, n: fx.Node) -> list[Record]:
        if n.op == "placeholder":
            return [Freeze(s, INPUT_REASON) for s in self._node_spaces(n)]
        if n.op == "output":
            recs: list[Record] = []
            for a in n.all_input_nodes:
                spaces = self._node_spaces(a)
                recs += [Freeze(s, OUTPUT_REASON) for s in spaces]
                if spaces:
                    self._frozen.append(FrozenEntry(a.name, "output", "a model output keeps "
                                                    "its shape, and so does all it is tied to"))
            return recs
        if n.op == "get_attr":
            return [Couple(s, Space.param(str(n.target), s.dim)) for s in self._node_spaces(n)]
        module = self.modules.get(str(n.target)) if n.op == "call_module" else None
        rule = lookup(n, module, self.rules)
        if module is not None and has_forward_hooks(module):
            rule = Frozen(f"module '{n.target}' has forward hooks, which run inside it where "
                          f"the trace cannot see what they compute")
        self.node_rules[n.name] = rule
        own = self._node_spaces(n)
        inputs = [s for a in n.all_input_nodes for s in self._node_spaces(a)]
        if n.target is operator.getitem:  # indexing a tuple concerns only the item taken
            inputs = [s for s in inputs if not s.is_item]
        if isinstance(rule, Frozen):
            if own or inputs:
                self._frozen.append(FrozenEntry(n.name, describe(n), rule.reason))
            return [Freeze(s, rule.reason) for s in own + inputs]
        ctx = CoupleContext(n, module, self.shapes, self.values,
                            str(n.target) if n.op == "call_module" else None, self._tuple_shapes)
        ctx.inner_first = self.head_channels
        try:
            produced = list(rule.couple(ctx))
        except Exception as exc:  # a rule that cannot read this call: freeze, never guess
            if strict_enabled():
                raise UnsupportedOpError(f"strict mode: {type(rule).__name__} raised on "
                                         f"{n.format_node()}: {type(exc).__name__}: {exc}") from exc
            reason = (f"{type(rule).__name__} cannot handle this call "
                      f"({type(exc).__name__}: {exc})")
            self._frozen.append(FrozenEntry(n.name, describe(n), reason))
            return [Freeze(s, reason) for s in own + inputs]
        recs = []
        for r in produced:
            if isinstance(r, Role):
                self.roles.setdefault(r.space, r.role)
                # a functional op's weight (a get_attr node's output): the tensor's role
                src = self._get_attr.get(r.space.node) if r.space.is_node_tensor else None
                if src is not None:
                    self.roles.setdefault(Space.param(src, r.space.dim), r.role)
            else:
                recs.append(r)
                # A model input is frozen anyway: a reason that freezes only one of its dims (a
                # shape guard reading x.shape) explains nothing and is not listed.
                if isinstance(r, Freeze) and r.reason and not r.space.is_input:
                    entry = FrozenEntry(n.name, describe(n), r.reason)
                    if entry not in self._frozen:
                        self._frozen.append(entry)
        mentioned = _mentioned(recs)
        todo = own + (inputs if rule.freezes_unmentioned else [])
        recs += [Freeze(s, "") for s in todo if s not in mentioned]
        return recs

    # --- queries -------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        """Every prunable group, in graph order."""
        return list(self._groups)

    def head_groups(self) -> set[int]:
        """Ids of the groups whose units are attention heads: those with an activation member
        on a space some node's rule names a head dim (:meth:`OpRule.head_dims`: the query, key
        and value of a scaled-dot-product attention, the operands of ``q @ k.transpose``)."""
        if self._head_groups is not None:
            return set(self._head_groups)
        head_spaces = {sp for n in self.graph_module.graph.nodes
                       if n.name in self.node_rules
                       for sp in self.node_rules[n.name].head_dims(n, self._tuple_shapes)}
        self._head_groups = {g.id for g in self._groups
                             if any(m.space in head_spaces for m in g.activations)}
        return set(self._head_groups)

    def frozen(self) -> list[FrozenEntry]:
        """Nodes that are frozen (no rule, a rule's caveat, graph I/O is implied) with reasons.

        Entries that hold back a prunable dim come first (``entry.blocks``: one of the node's
        dims would otherwise be in a unit with a parameter dim), then the harmless ones (ops
        whose tensors carry no prunable dim at all, such as building a mask from ``arange``).
        A dim that a rule leaves out (frozen without a reason of its own) gets an entry naming
        the op and its rule where it blocks a prunable dim. Each entry names the innermost
        module the node runs in (``entry.module``).
        """
        if self._frozen_sorted is None:
            self._frozen_sorted = self._sorted_frozen()
        return list(self._frozen_sorted)

    def _param_linked(self) -> np.ndarray:
        """Per element id: whether its unit, before any freeze, holds a parameter element."""
        couples: list[Record] = []

        def plain(records: Iterable[Record]) -> None:
            for r in records:
                if isinstance(r, Couple):
                    couples.append(r)
                elif isinstance(r, Choice):
                    plain(r.options[r.chosen][1])

        plain(self.records)
        a, b = _edges(self.table, couples, {})
        label, _ = _components(self.table.total, a, b)
        param_ids = [self.table.ids(s, None) for s in self.table.order if s.is_param]
        linked = np.zeros(int(label.max()) + 1, dtype=bool)
        if param_ids:
            linked[label[np.concatenate(param_ids)]] = True
        linked[label[0]] = False  # the frozen sentinel is no unit
        return linked[label]

    def _sorted_frozen(self) -> list[FrozenEntry]:
        linked = self._param_linked()
        nodes = {n.name: n for n in self.graph_module.graph.nodes}

        def blocks(spaces: list[Space]) -> bool:
            return any(linked[self.table.ids(s, None)].any() for s in spaces
                       if s in self.table and self.table.size[s])

        def module_of(n: Optional[fx.Node]) -> str:
            if n is None:
                return ""
            if n.op == "call_module":
                return ""  # the op names the module
            stack = n.meta.get("nn_module_stack") or {}
            paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]]
            return paths[-1] if paths else ""

        def spaces_of(n: fx.Node, with_inputs: bool = True) -> list[Space]:
            own = self._node_spaces(n)
            if not with_inputs:
                return own
            return own + [s for a in n.all_input_nodes for s in self._node_spaces(a)
                          if not (n.target is operator.getitem and s.is_item)]

        out_node = next((n for n in self.graph_module.graph.nodes if n.op == "output"), None)

        def frozen_by(e: FrozenEntry) -> list[Space]:
            """The spaces the records behind entry ``e`` freeze."""
            if e.op == "output":
                lo, hi = self.record_spans.get(out_node.name, (0, 0)) if out_node else (0, 0)
                return [r.space for r in self.records[lo:hi] if isinstance(r, Freeze)
                        and r.space.node == e.node]
            lo, hi = self.record_spans.get(e.node, (0, 0))
            return [r.space for r in self.records[lo:hi]
                    if isinstance(r, Freeze) and r.reason == e.reason]

        entries = []
        for e in self._frozen:
            n = nodes.get(e.node)
            spaces = frozen_by(e) or (spaces_of(n) if n is not None else [])
            entries.append(replace(e, module=module_of(n), blocks=blocks(spaces)))
        listed = {e.node for e in entries}
        reasons = self.solution.freeze_reasons
        for n in self.graph_module.graph.nodes:  # dims a rule left out, where that blocks
            if n.name in listed or n.op != "call_function" and n.op != "call_method" \
                    and n.op != "call_module":
                continue
            silent = [s for s in self._node_spaces(n) if reasons.get(s) == ""
                      and s in self.table and self.table.size[s] and blocks([s])
                      and self.solution.is_frozen(self.table.ids(s, None)).all()]
            if silent:
                rule = self.node_rules.get(n.name)
                dims = ", ".join(str(s.dim) for s in silent)
                what = (f"dim {dims} of its output, so that dim stays" if len(silent) == 1
                        else f"dims {dims} of its output, so those dims stay")
                entries.append(FrozenEntry(
                    n.name, describe(n), f"its rule ({type(rule).__name__}) does not couple "
                    f"{what} whole", module_of(n), True))
        return sorted(entries, key=lambda e: not e.blocks)

    def report_frozen(self) -> str:
        return "\n".join(repr(e) for e in self.frozen()) or "(nothing frozen)"

    def space_size(self, space: Space) -> int:
        return self.table.size[space]

    def is_frozen(self, space: Space) -> bool:
        ids = self.table.ids(space, None)
        return bool(self.solution.is_frozen(ids).all())

    def node(self, name: str) -> fx.Node:
        for n in self.graph_module.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_networkx(self) -> Any:
        """A ``networkx.DiGraph`` of the fx nodes, annotated with shapes, rules and groups.

        Nodes carry ``op``, ``target``, ``shape``, ``rule`` and ``groups`` (ids of the groups
        whose activation members live on the node); edges follow data flow.
        """
        import networkx as nx

        g = nx.DiGraph()
        node_groups: dict[str, set[int]] = {}
        for grp in self._groups:
            for m in grp.activations:
                node_groups.setdefault(m.space.node, set()).add(grp.id)
        for n in self.graph_module.graph.nodes:
            rule = self.node_rules.get(n.name)
            g.add_node(n.name, op=n.op, target=str(n.target),
                       shape=tuple(self.shapes[n.name]) if isinstance(self.shapes.get(n.name),
                                                                      torch.Size) else None,
                       rule=type(rule).__name__ if rule is not None else None,
                       groups=sorted(node_groups.get(n.name, ())))
            for a in n.all_input_nodes:
                g.add_edge(a.name, n.name)
        return g

    def lint(self) -> None:
        """Check invariants: every unit has a parameter, members are sorted and in range."""
        for grp in self._groups:
            if not grp.params:
                raise AssertionError(f"group {grp.id} has no parameter member")
            for m in grp.members:
                n = self.table.size[m.space]
                if m.index.numel() and (int(m.index.min()) < 0 or int(m.index.max()) >= n):
                    raise AssertionError(f"member {m!r} out of range {n}")
                if m.index.numel() != m.index.unique().numel():
                    raise AssertionError(f"member {m!r} repeats an index")
                if set(m.unit.tolist()) - set(range(grp.num_units)):
                    raise AssertionError(f"member {m!r} names a unit outside its group")

    def __repr__(self) -> str:
        return (f"DependencyGraph({type(self.model).__name__}: {len(self._groups)} groups, "
                f"{sum(g.num_units for g in self._groups)} units, {len(self._frozen)} frozen)")


def trace(model: nn.Module, example_inputs: ExampleInputs, *,
          rules: Optional[dict[RuleKey, OpRule]] = None, leaf_modules: Iterable[Any] = (),
          ignore: Iterable[nn.Module] = (), head_channels: bool = False) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` into a :class:`DependencyGraph`.

    Args:
        model: any ``nn.Module`` in float32/float64 on a real device.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        rules: extra or overriding op rules for this call only, ``{nn.MyBlock: MyRule()}``.
        leaf_modules: module classes or instances not to trace into (frozen unless ruled).
        ignore: modules whose output dims must stay (e.g. the classifier).
        head_channels: where a dim is split into heads and per-head channels (``E -> (H,
            D)``: attention, GAT), tie its units to the channels inside the heads (the same
            ones in every head) instead of to whole heads, the default.

    Raises:
        TraceError: the model cannot be traced or fails on the inputs (message names where).
        ModelError: the model is on the meta device or in half precision.

    Example:
        >>> import torch, torch.nn as nn, structprune as sp
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> g = sp.trace(m, torch.randn(1, 3, 8, 8))
        >>> [grp.num_units for grp in g.groups()]
        [8]
    """
    return DependencyGraph(model, example_inputs, rules, leaf_modules, ignore, head_channels)
