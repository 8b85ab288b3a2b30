"""Multiply-accumulates (MACs) of a traced graph, as traced or at the sizes a plan would leave.

Every count is **per forward pass on the example inputs as given**: a batch of 2 counts twice
the MACs of a batch of 1, and a sequence model's count grows with the example's length.

Two sources, one per kind of node:

* **Rule formulas** (:meth:`OpRule.macs`) for the ops whose shapes a plan can change (convs,
  linears, matmuls, attention, norms). They take any sizes, so the MAC-target allocator can ask
  about plans not yet applied. A norm counts one MAC per output element.
* **PyTorch's FLOP counter** (:class:`torch.utils.flop_counter.FlopCounterMode`) for every other
  node: leaf modules without a rule (``nn.LSTM``, ``nn.GRU``, ``nn.TransformerEncoder``), ops whose
  rule has no formula, and any node whose rule's formula fails (with a
  :class:`~structprune.errors.StructpruneWarning` naming it). The counter counts two FLOPs per
  multiply-add of ``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions and attention and nothing
  for elementwise ops, so MACs = FLOPs / 2. Nodes are measured once per graph on the meta device
  (shapes only; a node the meta device cannot run is run for real) and the result is cached; a
  node whose shapes a plan changes is measured again at the new shapes.
"""
from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from .errors import StructpruneWarning
from .graph.shapes import ShapeInterpreter, _load_args, placeholder_values, to_meta
from .modes import eval_mode
from .rules import MacContext, OpRule, Space

if TYPE_CHECKING:
    from .graph.depgraph import DependencyGraph

_CALLS = ("call_module", "call_function", "call_method")


def has_formula(rule: OpRule) -> bool:
    """True if ``rule`` counts its own MACs (overrides :meth:`OpRule.macs`)."""
    return type(rule).macs is not OpRule.macs


def count_macs(graph: "DependencyGraph", sizes: Optional[dict[Space, int]] = None,
               per_node: bool = False) -> Any:
    """MACs of one forward pass of ``graph`` on its example inputs, at ``sizes`` (default: as
    traced; pass ``plan.new_sizes()`` for a plan not yet applied).

    Rule formulas count the nodes that have one; PyTorch's FLOP counter counts every other node
    (FLOPs / 2), so leaf modules without a rule count too. Returns the total, or
    ``(total, {node name: MACs})`` over the nodes with MACs when ``per_node``.
    """
    sizes = sizes if sizes is not None else graph.table.size
    measured = _measured(graph)
    total, by_node = 0, {}
    for n in graph.graph_module.graph.nodes:
        rule = graph.node_rules.get(n.name)
        if rule is None or n.op not in _CALLS:
            continue
        if has_formula(rule):
            mctx = MacContext(n, str(n.target) if n.op == "call_module" else None, graph.shapes,
                              sizes, graph.graph_module)
            try:
                m = int(rule.macs(mctx))
            except Exception as exc:  # count it anyway, and say so once per graph and node
                m = measured.macs_at(n, sizes)
                if n.name not in measured.warned:
                    measured.warned.add(n.name)
                    warnings.warn(f"{type(rule).__name__}.macs failed on node '{n.name}' "
                                  f"({type(exc).__name__}: {exc}); its MACs ({m}) were counted "
                                  f"with torch's FlopCounterMode instead", StructpruneWarning,
                                  stacklevel=2)
        else:
            m = measured.macs_at(n, sizes)
        total += m
        if per_node and m:
            by_node[n.name] = m
    return (total, by_node) if per_node else total


class _Measured:
    """FlopCounterMode counts of one graph's nodes at the traced shapes, plus what it takes to
    count a node again at other sizes: meta values of every node's output."""

    def __init__(self, graph: "DependencyGraph") -> None:
        self._graph = weakref.ref(graph)  # the cache's value must not keep its key alive
        self.macs: dict[str, int] = {}
        self.metas: dict[fx.Node, Any] = {}
        self.warned: set[str] = set()
        self._spaces: dict[str, list[tuple[Space, int]]] = {}
        self._memo: dict[tuple, int] = {}
        self._run()

    @property
    def graph(self) -> "DependencyGraph":
        graph = self._graph()
        assert graph is not None, "a graph's MAC counts outlived the graph"
        return graph

    # --- the one run over the graph ------------------------------------------------------------
    def _run(self) -> None:
        gm = self.graph.graph_module
        inputs = placeholder_values(gm, self.graph.args, self.graph.kwargs)
        run = _FlopRun(self, meta=True)
        try:
            run.run_graph(inputs)
            return
        except Exception:  # data-dependent ops or missing meta kernels: run for real
            self.macs.clear()
            self.metas.clear()
        _FlopRun(self, meta=False).run_graph(inputs)

    def needs_count(self, n: fx.Node) -> bool:
        rule = self.graph.node_rules.get(n.name)
        return n.op in _CALLS and rule is not None and not has_formula(rule)

    # --- counts at other sizes -----------------------------------------------------------------
    def macs_at(self, n: fx.Node, sizes: dict[Space, int]) -> int:
        """MACs of node ``n`` by FlopCounterMode at ``sizes``."""
        if n.name not in self.macs:  # a formula node whose formula failed: count it now
            try:
                self.macs[n.name] = self._count(n, None)
            except Exception:  # the meta device cannot run it either (the warning says 0)
                self.macs[n.name] = 0
        base = self.macs[n.name]
        if not base:
            return 0  # no multiply-adds at the traced shapes, so none at smaller ones
        changed = tuple((s, sizes[s]) for s, size in self._node_spaces(n)
                        if sizes.get(s, size) != size)
        if not changed:
            return base
        key = (n.name, changed)
        if key not in self._memo:
            try:
                self._memo[key] = self._count(n, sizes)
            except Exception:  # cannot run at the new shapes: the traced count, an upper bound
                self._memo[key] = base
        return self._memo[key]

    def _node_spaces(self, n: fx.Node) -> list[tuple[Space, int]]:
        """``(space, traced size)`` of every tensor ``n`` reads or writes (module tensors too)."""
        if n.name not in self._spaces:
            size = self.graph.table.size
            names = {a.name for a in n.all_input_nodes} | {n.name}
            owner = str(n.target) if n.op == "call_module" else None
            out = [(s, k) for s, k in size.items() if s.node in names
                   or (owner is not None and s.module_path == owner)]
            self._spaces[n.name] = out
        return self._spaces[n.name]

    def _count(self, n: fx.Node, sizes: Optional[dict[Space, int]]) -> int:
        """Run ``n`` alone on meta tensors (at ``sizes``, else as traced) under FlopCounterMode."""
        env = {a: _resized(self.metas[a], lambda d, a=a: Space.of_node(a, d),
                           lambda k, d, a=a: Space.item(a.name, k, d), sizes)
               for a in n.all_input_nodes}
        args = _load_args(n.args, env)
        kwargs = _load_args(n.kwargs, env) if n.kwargs else {}
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            _call(self.graph, n, args, kwargs, sizes)
        return fc.get_total_flops() // 2


def _resized(v: Any, space: Callable[[int], Space], item: Optional[Callable[[int, int], Space]],
             sizes: Optional[dict[Space, int]]) -> Any:
    """Meta value ``v`` with the sizes ``sizes`` gives its spaces: ``space(d)`` is the space of
    a tensor's dim ``d``, ``item(k, d)`` that of a tuple's item ``k``."""
    if sizes is None:
        return v
    if isinstance(v, torch.Tensor):
        shape = [sizes.get(space(d), k) for d, k in enumerate(v.shape)]
        return v.new_empty(shape) if list(v.shape) != shape else v
    if (item is not None and isinstance(v, (tuple, list))
            and any(isinstance(x, torch.Tensor) for x in v)):
        return type(v)(_resized(x, lambda d, k=k: item(k, d), None, sizes)
                       if isinstance(x, torch.Tensor) else x for k, x in enumerate(v))
    return v


def _call(graph: "DependencyGraph", n: fx.Node, args: Any, kwargs: Any,
          sizes: Optional[dict[Space, int]]) -> Any:
    """Call node ``n``'s op on ``args``; a module runs with meta copies of its tensors."""
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    from torch.func import functional_call

    mod = graph.modules[str(n.target)]
    tensors = {}
    for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
        meta = t.to("meta")
        qual = f"{n.target}.{name}"
        tensors[name] = _resized(meta, lambda d, q=qual: Space.param(q, d), None, sizes)
    with eval_mode(mod):
        return functional_call(mod, tensors, args, kwargs)


class _FlopRun(ShapeInterpreter):
    """Runs the graph once, counting the FLOPs of each node that has no MAC formula."""

    def __init__(self, measured: _Measured, meta: bool) -> None:
        super().__init__(measured.graph.graph_module, meta)
        self.measured = measured
        self.counter = FlopCounterMode(display=False)

    def run_graph(self, inputs: list) -> Any:
        with self.counter:
            return super().run_graph(inputs)

    def run_node(self, n: fx.Node) -> Any:
        if not self.measured.needs_count(n):
            out = super().run_node(n)
            self.measured.metas[n] = to_meta(out)
            return out
        before = self.counter.get_total_flops()
        if self.meta and n.op == "call_module":
            # Through the module's own kernels: the interpreter's shortcut for nn.Conv2d and
            # nn.Linear skips them (its function shortcuts are all for ops without FLOPs).
            args = _load_args(n.args, self.env)
            kwargs = _load_args(n.kwargs, self.env) if n.kwargs else {}
            out = _call(self.measured.graph, n, args, kwargs, None)
        else:
            out = super().run_node(n)
        self.measured.metas[n] = to_meta(out)
        macs = (self.counter.get_total_flops() - before) // 2
        if not self.meta:
            # Some CPU kernels run as one op the counter does not know (nn.LSTM on oneDNN, the
            # fused TransformerEncoderLayer): count the node on the meta device as well.
            try:
                macs = max(macs, self.measured._count(n, None))
            except Exception:
                pass
        self.measured.macs[n.name] = macs
        return out


_CACHE: "weakref.WeakKeyDictionary[DependencyGraph, _Measured]" = weakref.WeakKeyDictionary()


def _measured(graph: "DependencyGraph") -> _Measured:
    """The FlopCounterMode counts of ``graph``, measured on first use and cached with it."""
    m = _CACHE.get(graph)
    if m is None:
        m = _CACHE[graph] = _Measured(graph)
    return m


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
