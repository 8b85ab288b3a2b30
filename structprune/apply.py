"""Physical pruning: one slicing pass over parameters and buffers, then module attributes and
literal shape arguments, checked node by node against the shapes the plan implies.

The pass runs the graph once on the example inputs. Before each node runs, its rule's ``update``
adjusts module attributes (``in_channels``) or rewrites literal arguments that no longer match
(``view(B, 8, 3, 16)`` after a head is removed); after it runs, its output shape must equal the
shape the plan implies, or the pass raises. A wrong model is never returned silently.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import PlanError, UnsupportedOpError
from .graph.inputs import add_guard_hook
from .graph.trace import ShapeInterpreter, placeholder_values, plain_module
from .oracle import flatten_outputs
from .plan import Plan
from .rules import ApplyContext, OpRule, Space
from .scratch import scratch_space, temporary


def _owner(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    path, _, name = qualname.rpartition(".")
    return (root.get_submodule(path) if path else root), name


def _tensors_by_name(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``root`` by qualified name (tied tensors under each name)."""
    out = dict(root.named_parameters(remove_duplicate=False))
    out.update(root.named_buffers(remove_duplicate=False))
    return out


def _by_tensor(dropped: dict[Space, np.ndarray]) -> dict[str, list[tuple[int, np.ndarray]]]:
    """``{qualified tensor name: [(dim, dropped indices), ...]}`` over the parameter spaces."""
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for s, idx in dropped.items():
        if s.is_param and len(idx):
            out.setdefault(s.name, []).append((s.dim, idx))
    return out


def slice_like(t: torch.Tensor, dims: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """``t`` without the indices ``dims`` lists (``[(dim, dropped indices), ...]``), contiguous
    and owning its memory; ``t`` itself is not changed."""
    new = t.detach()
    steps = sorted(dims, key=lambda d: d[0])  # outer dim first: fewer bytes
    for k, (dim, idx) in enumerate(steps):
        mask = np.ones(new.shape[dim], dtype=bool)
        mask[idx] = False
        keep = torch.as_tensor(np.flatnonzero(mask), dtype=torch.long, device=t.device)
        if k == 0 and len(steps) == 2:  # the halfway copy goes to scratch space
            shape = list(new.shape)
            shape[dim] = len(keep)
            new = torch.index_select(new, dim, keep, out=temporary(shape, new.dtype, new.device))
        else:
            new = new.index_select(dim, keep)
    return new.contiguous()


def sliced_tensors(root: nn.Module, dropped: dict[Space, np.ndarray]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{qualified name: (old tensor, new sliced tensor)}`` for every parameter, buffer or
    tensor attribute of ``root`` that loses indices."""
    named = _tensors_by_name(root)
    out = {}
    for qual, dims in _by_tensor(dropped).items():
        t = named[qual] if qual in named else getattr(*_owner(root, qual))
        new = slice_like(t, dims)
        out[qual] = (t, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(
            t, nn.Parameter) else new)
    return out


def copy_sliced(gm: fx.GraphModule, dropped: dict[Space, np.ndarray]) -> fx.GraphModule:
    """A deep copy of ``gm`` in which the tensors that lose indices are already sliced."""
    return copy_sliced_roots([gm], sliced_tensors(gm, dropped))[0]


def copy_sliced_roots(roots: list[nn.Module], sliced: dict[str, tuple[torch.Tensor, torch.Tensor]]
                      ) -> list[nn.Module]:
    """Deep copies of ``roots``, made together (a module or tensor they share stays shared),
    in which every tensor ``sliced`` lists (``{name: (old, new)}``) is its sliced version.

    The sliced tensors, clones of the others and plain copies of ordinary modules are handed to
    ``deepcopy`` through its memo, so each weight is copied once (sliced or whole, never copied
    and then sliced) and the module tree costs little more than its dictionaries. A sliced
    tensor is replaced wherever it is held: tied weights, lists, plain attributes.
    """
    memo: dict[int, Any] = {id(old): new for old, new in sliced.values()}
    tensors = {id(t): t for root in roots for t in _tensors_by_name(root).values()}
    storages: dict[int, int] = {}  # tensors per storage: views must keep sharing (deepcopy)
    for t in tensors.values():
        storages[t.untyped_storage().data_ptr()] = storages.get(
            t.untyped_storage().data_ptr(), 0) + 1
    for t in tensors.values():
        if (id(t) not in memo and _plain_tensor(t)
                and storages[t.untyped_storage().data_ptr()] == 1):
            memo[id(t)] = _clone(t)
    for root in roots:
        for m in root.modules():
            if m is not root or not isinstance(m, fx.GraphModule):
                _copy_module(m, memo)
    out = []
    for root in roots:
        target = copy.deepcopy(root, memo)
        if isinstance(root, fx.GraphModule):
            target.__class__.__name__ = type(root).__name__  # deepcopy drops the model's name
        out.append(target)
    return out


_ATOMIC = (int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
           torch.memory_format)


def _atomic(v: Any) -> bool:
    return isinstance(v, _ATOMIC) or (type(v) is tuple and all(_atomic(x) for x in v))


def _plain_tensor(t: torch.Tensor) -> bool:
    """A leaf tensor that ``clone`` copies exactly as ``deepcopy`` would: no subclass or extra
    attributes, contiguous, the whole of its storage."""
    return (type(t) in (torch.Tensor, nn.Parameter) and not t.__dict__ and t.grad_fn is None
            and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _clone(t: torch.Tensor) -> torch.Tensor:
    c = t.detach().clone()
    if isinstance(t, nn.Parameter):
        return nn.Parameter(c, requires_grad=t.requires_grad)
    return c.requires_grad_(t.requires_grad)


def _copy_module(m: nn.Module, memo: dict[int, Any]) -> Any:
    """What ``deepcopy(m, memo)`` returns, built by copying dictionaries where that is the same.

    Modules with their own copy or pickling hooks are left to ``deepcopy``; every attribute that
    is not an immutable value goes through ``deepcopy`` with the shared memo, so aliasing
    between modules and tensors is kept exactly as ``deepcopy`` keeps it.
    """
    if id(m) in memo:
        return memo[id(m)]
    cls = type(m)
    if (getattr(cls, "__deepcopy__", None) is not None or cls.__reduce_ex__ is not object.__reduce_ex__
            or cls.__reduce__ is not object.__reduce__ or cls.__getstate__ is not nn.Module.__getstate__
            or cls.__setstate__ is not nn.Module.__setstate__):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state = {}
    for k, v in m.__dict__.items():
        if _atomic(v):
            state[k] = v
        elif k == "_modules":
            state[k] = type(v)((n, None if c is None else _copy_module(c, memo)) for n, c in v.items())
        elif k in ("_parameters", "_buffers") and type(v) in (dict, OrderedDict):
            state[k] = type(v)((n, memo[id(t)] if id(t) in memo else copy.deepcopy(t, memo))
                               for n, t in v.items())
        elif k.startswith("_") and type(v) in (dict, OrderedDict, set) and not v:  # hooks
            state[k] = type(v)()
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__dict__.update(state)
    return new


class _Applier(ShapeInterpreter):
    def __init__(self, gm: fx.GraphModule, rules: dict[str, OpRule], shapes: dict[str, Any],
                 dropped: dict[Space, np.ndarray], meta: bool) -> None:
        super().__init__(gm, meta)
        self.node_rules, self.shapes, self.dropped_idx = rules, shapes, dropped
        self.modules = dict(gm.named_modules())

    def run_node(self, n: fx.Node) -> Any:
        rule = self.node_rules.get(n.name)
        module = self.modules.get(str(n.target)) if n.op == "call_module" else None
        actx = ApplyContext(n, module, self.env, self.shapes, self.dropped_idx)
        if rule is not None:
            try:
                rule.update(actx)
            except NotImplementedError as exc:
                raise UnsupportedOpError(f"cannot apply the plan at {n.format_node()}: {exc}. "
                                         f"Freeze this op (ignore=/leaf_modules=).") from exc
        out = super().run_node(n)
        self._check(n, out, actx)
        return out

    def _check(self, n: fx.Node, out: Any, actx: ApplyContext) -> None:
        if isinstance(out, torch.Tensor):
            want = actx.new_shape(n)
            got = tuple(out.shape)
        elif actx.old_items(n) is not None and isinstance(out, (tuple, list)):
            want = actx.new_items(n)
            got = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in out]
        else:
            return
        if want is not None and got != want:
            raise UnsupportedOpError(
                f"after slicing, node {n.format_node()} produced shape {got} where the plan "
                f"implies {want}. Its rule cannot express this plan; freeze the op (ignore=, "
                f"leaf_modules=) or register a rule for it. Nothing was returned.")


def apply_plan(plan: Plan, example_inputs: tuple[tuple, dict]) -> fx.GraphModule:
    """A new, sliced copy of ``plan.graph.graph_module``; the traced model is not touched."""
    with scratch_space():
        return _apply_plan(plan, example_inputs)


def _apply_plan(plan: Plan, example_inputs: tuple[tuple, dict]) -> fx.GraphModule:
    graph = plan.graph
    dropped = plan.dropped_indices()
    target = copy_sliced(graph.graph_module, dropped)
    before = _calls(target.graph)
    _update_and_check(target, plan, dropped, example_inputs)
    # Rules replace a node's args/kwargs/target to change them; when none did, the graph is a
    # copy of a valid one.
    if len(before) != len(target.graph.nodes) or _calls_changed(before):
        target.graph.lint()
    return plain_module(target)


@dataclass(frozen=True)
class Applied:
    """What :func:`apply_plan_copy` returned: the pruned model, and why it has that type."""

    model: nn.Module
    own_class: bool  # an object of the model's own class (its forward runs), else a GraphModule
    reason: str


def apply_plan_copy(plan: Plan, example_inputs: tuple[tuple, dict]) -> Applied:
    """A pruned copy of the traced model, of the model's own class when its ``forward`` runs
    unchanged on the smaller modules, else an ``fx.GraphModule`` with the rewritten graph.

    The model and its traced module are copied together (they share their submodules and
    tensors, and so do the copies), with the sliced tensors in place of the old ones; the rules
    update the copied modules during the checking run. The copy of the model is returned when
    no literal in the graph had to change, fx lifted no tensor constant that loses indices,
    and the copy's own forward gives the pruned graph's output on the example inputs; otherwise
    the copied graph is returned, and ``reason`` says why.
    """
    applied = _apply_plan_copy(plan, example_inputs)
    if not applied.own_class:
        applied.model.meta["structprune_returned"] = applied.reason
    return applied


def _apply_plan_copy(plan: Plan, example_inputs: tuple[tuple, dict]) -> Applied:
    graph = plan.graph
    gm, model = graph.graph_module, graph.model
    if gm.meta.get("structprune_capture") == "export":
        return Applied(apply_plan(plan, example_inputs), False,
                       "captured by torch.export: its graph does not run the model's own "
                       "modules, so the pruned graph is returned")
    with scratch_space():
        dropped = plan.dropped_indices()
        sliced = sliced_tensors(gm, dropped)
        model_c, gm_c = copy_sliced_roots([model, gm], sliced)
        before = _calls(gm_c.graph)
        _update_and_check(gm_c, plan, dropped, example_inputs)
        changed = [n for n, t, a, k in before if not (
            _same(t, n.target) and _same(a, n.args) and _same(k, n.kwargs))]
        if len(before) != len(gm_c.graph.nodes) or changed:
            gm_c.graph.lint()
            where = changed[0].format_node() if changed else "(nodes added or removed)"
            return Applied(plain_module(gm_c), False,
                           f"a literal size in forward had to change ({where}), so the "
                           f"rewritten graph is returned")
        constants = [q for q in sliced if q.rpartition(".")[2].startswith("_tensor_constant")]
        if constants:
            return Applied(plain_module(gm_c), False,
                           f"forward reads a tensor that is not a parameter, buffer or module "
                           f"attribute (fx lifted it as '{constants[0]}'), so the rewritten "
                           f"graph is returned")
        problem = _own_forward_differs(model_c, gm_c, graph, example_inputs)
        if problem:
            return Applied(plain_module(gm_c), False,
                           f"the model's own forward {problem} on the pruned modules, so the "
                           f"rewritten graph is returned")
        add_guard_hook(model_c, gm.meta.get("structprune_specialised", {}))
        return Applied(model_c, True, f"{type(model).__name__}'s own forward runs on the pruned "
                                      f"modules, so an object of that class is returned")


def _own_forward_differs(model: nn.Module, gm: fx.GraphModule, graph: Any,
                         example_inputs: tuple[tuple, dict]) -> str:
    """Why ``model`` (its own forward, on the pruned modules) does not compute what the pruned
    graph ``gm`` computes, or ``""`` when it does.

    Exact and cheap where it can be: ``model`` is traced again, the same way, and must give
    ``gm``'s graph node for node (a forward that reads a pruned attribute, branches on one or
    bakes one into a literal traces to another graph). A module the tracer replaces by a
    functional equivalent (``nn.MultiheadAttention``) runs its own forward in the model, so
    there the outputs are compared instead, on the example inputs and random ones like them.
    """
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return _retrace_differs(model, gm, graph, example_inputs)
    for inputs in (example_inputs, _random_like(example_inputs)):
        problem = _outputs_differ(model, gm, inputs, graph.traced_training)
        if problem:
            return problem
    return ""


def _retrace_differs(model: nn.Module, gm: fx.GraphModule, graph: Any,
                     example_inputs: tuple[tuple, dict]) -> str:
    from .graph.inputs import concrete_args, specialise
    from .graph.trace import Tracer, _drop_unused, analysis_module

    args, kwargs = example_inputs
    concrete = concrete_args(model, args, kwargs)
    try:
        tracer = Tracer(graph.rules, graph._leaf_modules)
        again = tracer.trace(model, concrete_args=concrete or None)
        n_nodes = len(again.nodes)
        _drop_unused(again)  # as the capture did
        dead = len(again.nodes) != n_nodes
        again_gm = analysis_module(tracer.root, again, type(model).__name__)
        specialise(again_gm, model, args, kwargs, concrete)
    except Exception as exc:  # the pruned model's forward does not trace any more
        return f"fails to trace ({type(exc).__name__})"
    if not same_graph(again_gm.graph, gm.graph):
        return ("traces to another graph than the pruned one (it reads something the graph "
                "fixed, such as a module attribute)")
    return _dead_code_fails(model, graph, example_inputs) if dead else ""


def _dead_code_fails(model: nn.Module, graph: Any, example_inputs: tuple[tuple, dict]) -> str:
    """The analysis graph leaves out computations whose results nothing reads; the model's own
    forward still runs them. Run the whole forward, as traced, on the meta device (shapes
    only): a dead computation that no longer fits the pruned sizes fails here."""
    from .graph.inputs import concrete_args
    from .graph.trace import ShapeInterpreter, Tracer

    args, kwargs = example_inputs
    try:
        raw = Tracer(graph.rules, graph._leaf_modules).trace(
            model, concrete_args=concrete_args(model, args, kwargs) or None)
        whole = fx.GraphModule(model, raw)
        ShapeInterpreter(whole, meta=True).run_graph(placeholder_values(whole, args, kwargs))
    except Exception as exc:
        return f"fails ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    return ""


def same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    """Whether two graphs have the same nodes in the same order: ops, targets and arguments
    (nodes matched by position, values by ``==``)."""
    na, nb = list(a.nodes), list(b.nodes)
    if len(na) != len(nb):
        return False
    match: dict[fx.Node, fx.Node] = {}
    for x, y in zip(na, nb):
        if x.op != y.op or not _same(x.target, y.target):
            return False
        args = fx.node.map_arg(x.args, lambda n: match.get(n, n))
        kwargs = fx.node.map_arg(x.kwargs, lambda n: match.get(n, n))
        if not (_same(args, y.args) and _same(kwargs, y.kwargs)):
            return False
        match[x] = y
    return True


def _random_like(example_inputs: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """The example inputs with every floating tensor replaced by a random one of its shape and
    scale (a branch on a value the example happens to avoid, such as a sign, shows there)."""
    gen = torch.Generator().manual_seed(0)

    def rnd(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            scale = float(v.detach().abs().max()) if v.numel() else 1.0
            r = torch.randn(v.shape, generator=gen, dtype=v.dtype)
            return (r * max(scale, 1e-3)).to(v.device)
        if isinstance(v, (list, tuple)):
            return type(v)(rnd(x) for x in v)
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        return v

    args, kwargs = example_inputs
    return rnd(args), rnd(kwargs)


def _outputs_differ(model: nn.Module, gm: fx.GraphModule, example_inputs: tuple[tuple, dict],
                    training: bool = False) -> str:
    """Compare in the mode the graph was traced in: eval, or training (its branches, e.g.
    auxiliary heads), with the same random numbers for both runs (dropout) and every buffer
    (running statistics) put back after each."""
    from .graph.trace import eval_mode

    args, kwargs = example_inputs
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def call(fn: Any, *a: Any, **k: Any) -> Any:
        if not training:
            with eval_mode(model), eval_mode(gm):
                return fn(*a, **k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                return fn(*a, **k)
            finally:
                for b, saved in buffers:
                    b.data.copy_(saved)

    try:
        with torch.no_grad():
            want = call(gm, *placeholder_values(gm, args, kwargs))
            got = call(model, *args, **kwargs)
    except Exception as exc:  # the model's forward cannot run on the smaller modules
        return f"fails ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    a, b = flatten_outputs(got), flatten_outputs(want)
    if len(a) != len(b):
        return "returns another structure"
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return f"returns shape {tuple(x.shape)} where the pruned graph gives {tuple(y.shape)}"
        if x.is_floating_point() and x.numel():
            scale = max(1.0, float(y.abs().max()))
            if not float((x - y).abs().max()) <= 1e-5 * scale:
                return "computes different values"
        elif not torch.equal(x, y):
            return "computes different values"
    return ""


def _update_and_check(gm: fx.GraphModule, plan: Plan, dropped: dict[Space, np.ndarray],
                      example_inputs: tuple[tuple, dict]) -> None:
    """Run ``gm`` once, updating attributes and literals before each node and checking its new
    shape after it: on the meta device, or for real where a meta kernel is missing (updates are
    idempotent, so a failed meta run can be redone)."""
    graph = plan.graph
    inputs = placeholder_values(gm, *example_inputs)
    try:
        _Applier(gm, graph.node_rules, graph.shapes, dropped, meta=True).run_graph(inputs)
    except UnsupportedOpError:
        raise
    except Exception:
        _Applier(gm, graph.node_rules, graph.shapes, dropped, meta=False).run_graph(inputs)


def literal_sizes_error(model: nn.Module) -> PlanError:
    return PlanError(f"{type(model).__name__} cannot be pruned in place: its forward has literal "
                     f"sizes that must change. Use sp.prune(...), which returns a model with the "
                     f"rewritten graph.")


def _calls(graph: fx.Graph) -> list[tuple[fx.Node, Any, Any, Any]]:
    return [(n, n.target, n.args, n.kwargs) for n in graph.nodes]


def _same(a: Any, b: Any) -> bool:
    """Equal node arguments: nodes by identity, containers item by item, values by ``==``."""
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, fx.Node):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, slice):
        return _same(a.start, b.start) and _same(a.stop, b.stop) and _same(a.step, b.step)
    try:
        eq = a == b
    except Exception:
        return False
    return eq if isinstance(eq, bool) else False


def _calls_changed(before: list[tuple[fx.Node, Any, Any, Any]]) -> bool:
    """Whether any node's target, args or kwargs differ from ``(node, target, args, kwargs)``
    recorded before (rules rewrite literal sizes by replacing a node's args)."""
    return any(not (_same(t, n.target) and _same(a, n.args) and _same(k, n.kwargs))
               for n, t, a, k in before)


class Snapshot:
    """What in-place slicing may change, saved so that a failure leaves everything as it was:
    every module's attributes, parameters and buffers, every tensor's data, every node's call,
    and the optimizer state of the parameters."""

    def __init__(self, roots: list[nn.Module], graph: Optional[fx.Graph] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        seen: dict[int, nn.Module] = {}
        for root in roots:
            for m in root.modules():
                seen.setdefault(id(m), m)
        self.modules = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers))
                        for m in seen.values()]
        self.hooks = [(table, dict(table)) for m in seen.values()
                      for table in (m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs)]
        tensors = {id(t): t for _, _, ps, bs in self.modules
                   for t in list(ps.values()) + list(bs.values()) if t is not None}
        self.data = [(t, t.data, t.grad) for t in tensors.values()]
        self.nodes = _calls(graph) if graph is not None else []
        self.optimizer = optimizer
        self.opt_state = ({p: dict(st) for p, st in optimizer.state.items()}
                          if optimizer is not None else {})

    def calls_changed(self) -> bool:
        return _calls_changed(self.nodes)

    def restore(self) -> None:
        for m, attrs, params, buffers in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        for table, saved in self.hooks:
            table.clear()
            table.update(saved)
        for t, data, grad in self.data:
            if t.data is not data:
                t.data = data
            t.grad = grad
        for n, t, a, k in self.nodes:
            if n.target is not t:
                n.target = t
            if n.args is not a:
                n.args = a
            if n.kwargs is not k:
                n.kwargs = k
        if self.optimizer is not None:
            for p, st in self.opt_state.items():
                self.optimizer.state[p] = st


def slice_optimizer_state(optimizer: torch.optim.Optimizer, old_shapes: dict[int, tuple],
                          dims_of: dict[int, list[tuple[int, np.ndarray]]]) -> None:
    """Slice the per-parameter state of ``optimizer`` (Adam moments, momentum buffers, ...)
    like the parameters it belongs to: every state tensor with the parameter's old shape loses
    the same indices; scalars (``step``) stay. ``old_shapes`` and ``dims_of`` are keyed by
    ``id(parameter)``."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in dims_of or p not in optimizer.state:
                continue
            st = optimizer.state[p]
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and tuple(v.shape) == old_shapes[id(p)]:
                    st[k] = slice_like(v, dims_of[id(p)]).clone()
                elif isinstance(v, torch.Tensor) and v.dim() > 0:
                    raise PlanError(
                        f"cannot slice optimizer state '{k}' of a pruned parameter: its shape "
                        f"{tuple(v.shape)} is not the parameter's {old_shapes[id(p)]}. Rebuild "
                        f"the optimizer after pruning.")


def held_parameters(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def apply_plan_(plan: Plan, example_inputs: tuple[tuple, dict],
                optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Apply ``plan`` to the traced model itself: its modules get new attributes and every
    parameter and buffer that loses indices keeps its identity and gets the sliced data
    (``t.data = ...``), so tied weights stay tied and an optimizer built before pruning still
    holds the model's parameters. Their ``.grad`` is dropped (it has the old shape), and
    ``optimizer``'s per-parameter state is sliced along with them.

    Raises :class:`PlanError` when the model's own forward would need new literal sizes
    (``x.view(B, 64, -1)``) or when the graph was captured by ``torch.export`` (its modules are
    not the model's); any error leaves the model and the optimizer exactly as they were.
    """
    graph = plan.graph
    gm, model = graph.graph_module, graph.model
    if gm.meta.get("structprune_capture") == "export":
        raise PlanError(f"{type(model).__name__} was captured by torch.export, whose graph does "
                        f"not run the model's own modules; prune it with sp.prune(...)")
    with scratch_space():
        dropped = plan.dropped_indices()
        snap = Snapshot([model, gm], gm.graph, optimizer)
        try:
            sliced = sliced_tensors(gm, dropped)
            dims = _by_tensor(dropped)
            old_shapes: dict[int, tuple] = {}
            dims_of: dict[int, list[tuple[int, np.ndarray]]] = {}
            for qual, (old, new) in sliced.items():
                if qual.rpartition(".")[2].startswith("_tensor_constant"):
                    raise PlanError(
                        f"{type(model).__name__} cannot be pruned in place: it reads a tensor "
                        f"that is not a parameter, buffer or attribute of a module (fx lifted it "
                        f"as '{qual}'), which would keep its old size. Register it as a buffer, "
                        f"or use sp.prune(...).")
                if id(old) in old_shapes:  # a tied tensor under a second name
                    continue
                old_shapes[id(old)], dims_of[id(old)] = tuple(old.shape), dims[qual]
                old.data = new.detach()
                old.grad = None
            if optimizer is not None:
                slice_optimizer_state(optimizer, old_shapes, dims_of)
            _update_and_check(gm, plan, dropped, example_inputs)
            if snap.calls_changed():
                raise literal_sizes_error(model)
            problem = _own_forward_differs(model, gm, graph, example_inputs)
            if problem:
                raise PlanError(f"{type(model).__name__} cannot be pruned in place: on the "
                                f"pruned modules its own forward {problem}. Use sp.prune(...), "
                                f"which returns the rewritten graph.")
            add_guard_hook(model, gm.meta.get("structprune_specialised", {}))
        except BaseException:
            snap.restore()
            raise
