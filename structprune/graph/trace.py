"""Capture a model as an fx graph whose leaves are the modules we have rules for, and record shapes.

``capture`` runs ``torch.fx`` symbolic tracing with a :class:`Tracer` whose leaves are every module
that has a rule (conv, linear, norms, ...) plus PyTorch's own leaf modules; ``nn.MultiheadAttention``
is decomposed into functional ops so that its heads become visible (and prunable) in the graph.
Models that symbolic tracing cannot capture (they branch on shapes or turn sizes into ints) are
captured with ``torch.export`` on the example inputs instead (:func:`capture_export`): a graph of
ATen ops whose rules live in ``ops/aten.py``.
``record_shapes`` runs the graph once on the example inputs and keeps every node's output shape
and every non-tensor value (``x.size(0)``, ``H // 2``) that shape arguments are built from.
"""
from __future__ import annotations

import collections
import operator
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .. import diagnostics
from ..errors import ModelError, TraceError
from ..modes import eval_mode as eval_mode
from ..rules import OpRule, RuleKey, module_rule

ExampleInputs = Any  # a tensor, a tuple of positional inputs, or a dict of keyword inputs



def normalize_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    """Turn a tensor, tuple/list or dict of example inputs into ``(args, kwargs)``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword "
                     f"inputs, got {type(example_inputs).__name__}")


def check_model(model: nn.Module) -> None:
    """Refuse models we cannot analyse faithfully, naming the first offending tensor."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected an nn.Module, got {type(model).__name__}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ModelError(f"parameter '{name}' is on the meta device: there are no weights to "
                             f"score or slice. Materialise the model first (model.to_empty("
                             f"device='cpu') and load its state_dict).")
        if t.is_floating_point() and t.dtype in _BACK_TO:
            raise ModelError(f"parameter '{name}' is {t.dtype}: structprune analyses models in "
                             f"float32/float64 (scores and the oracle lose precision in "
                             f"{t.dtype}, and many CPU kernels lack it). Prune model.float() "
                             f"and convert the pruned model back with {_BACK_TO[t.dtype]} "
                             f"afterwards.")


    if has_forward_hooks(model):
        raise ModelError(f"{type(model).__name__} has forward hooks on the model itself: they run "
                         f"outside the forward that structprune traces. Remove them before "
                         f"pruning (and add them to the pruned model).")
    from torch.nn.utils import parametrize

    for name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            raise ModelError(f"module '{name}' ({type(m).__name__}) is parametrized (weight_norm, "
                             f"spectral_norm, ...): its weight is computed at every call. Call "
                             f"torch.nn.utils.parametrize.remove_parametrizations(module, "
                             f"'weight') first.")
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                raise ModelError(f"module '{name}' ({type(m).__name__}) holds '{k}', a tensor "
                                 f"computed by a hook (old-style torch.nn.utils.weight_norm?). "
                                 f"Remove the reparametrisation first "
                                 f"(torch.nn.utils.remove_weight_norm).")


def has_forward_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward (pre-)hooks of its own, structprune's argument guard aside."""
    from .inputs import _guard_hook

    hooks = list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
    return any(getattr(h, "func", None) is not _guard_hook for h in hooks)


# How to convert a pruned float32 model back to the dtype the user started from.
_BACK_TO = {torch.float16: ".half()", torch.bfloat16: ".to(torch.bfloat16)"}


class Tracer(fx.Tracer):
    """An fx tracer whose leaves are the modules with a rule (or named by the user).

    A module whose rule ``decomposes`` (:attr:`OpRule.decomposes`) is traced through the rule's
    :meth:`OpRule.trace_through` instead, a functional equivalent whose ops the graph sees
    (``nn.MultiheadAttention``: its heads appear as a reshape to ``(B, H, T, D)``); a call it
    declines, or a module the user made a leaf, stays one ``call_module`` node.
    """

    def __init__(self, rules: dict[RuleKey, OpRule], leaf_modules: Iterable[Any] = ()) -> None:
        super().__init__()
        self.rules = rules
        self.user_leaves = tuple(leaf_modules)
        self._sp_path_stack: list[str] = []
        self._sp_failed_at: Optional[str] = None

    def _is_user_leaf(self, m: nn.Module) -> bool:
        return any(m is leaf or (isinstance(leaf, type) and isinstance(m, leaf))
                   for leaf in self.user_leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._is_user_leaf(m):
            return True
        rule = module_rule(m, self.rules)
        if rule is not None:
            return not rule.decomposes
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        self._sp_path_stack.append(path)
        try:
            rule = None if self._is_user_leaf(m) else module_rule(m, self.rules)
            if rule is not None and rule.decomposes:
                def getp(name: str) -> Any:
                    return self.create_proxy("get_attr", f"{path}.{name}" if path else name, (), {})

                out = rule.trace_through(m, getp, *args, **kwargs)
                if out is not NotImplemented:
                    return out
                return self.create_proxy("call_module", path, args, kwargs)
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self._sp_failed_at is None:  # the innermost module is the culprit
                self._sp_failed_at = path
            raise
        finally:
            self._sp_path_stack.pop()


def capture(model: nn.Module, rules: dict[RuleKey, OpRule], leaf_modules: Iterable[Any] = (),
            concrete_args: Optional[dict] = None,
            example_inputs: Optional[tuple[tuple, dict]] = None) -> fx.GraphModule:
    """Symbolically trace ``model``; if that fails, capture it with ``torch.export`` on
    ``example_inputs`` (``(args, kwargs)``).

    Raises:
        TraceError: neither works (or fx fails and there are no example inputs). The message is
            short: the module and source line that failed, one line from each of fx and export,
            and what to try, including the largest submodules that do capture on their own.
            When the model does not even run on the example inputs, it says which module
            rejected which input shape instead. ``STRUCTPRUNE_DEBUG=1`` adds torch's full texts
            and keeps the chained exceptions.
    """
    tracer = Tracer(rules, leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean "could not capture"
        fx_exc: BaseException = exc
    else:
        _drop_unused(graph)
        return analysis_module(tracer.root, graph, type(model).__name__)
    debug = diagnostics.debug_enabled()
    if example_inputs is None:
        message = diagnostics.capture_failure(model, fx_exc, tracer._sp_failed_at, None, [])
        raise TraceError(message) from (fx_exc if debug else None)
    try:
        with diagnostics.quiet_torch():
            return capture_export(model, *example_inputs)
    except Exception as exc:  # export raises many types too
        export_exc: BaseException = exc
    run = diagnostics.run_eagerly(model, *example_inputs)
    if run.error is not None:  # the inputs do not fit: that is the first thing to fix
        raise TraceError(_eager_mismatch(model, example_inputs, run)) from (
            run.error if debug else None)

    def capture_one(m: nn.Module, args: tuple, kwargs: dict) -> str:
        try:
            Tracer(rules, leaf_modules).trace(m)
            return "fx"
        except Exception:  # fall back as capture() does
            capture_export(m, args, kwargs)
            return "export"

    candidates = diagnostics.capturable_submodules(model, run, capture_one)
    message = diagnostics.capture_failure(model, fx_exc, tracer._sp_failed_at, export_exc,
                                          candidates)
    raise TraceError(message) from (fx_exc if debug else None)


def _eager_mismatch(model: nn.Module, example_inputs: tuple[tuple, dict],
                    run: diagnostics.EagerRun) -> str:
    """The one-line message for a model that fails when run on its example inputs."""
    import inspect

    args, kwargs = example_inputs
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = []
    names += [f"arg{i}" for i in range(len(names), len(args))]
    given = {**dict(zip(names, args)), **kwargs}
    path = run.failed_module or ""
    module = model.get_submodule(path) if path else model
    got = run.inputs.get(path, ((), {}))[0]
    assert run.error is not None
    return diagnostics.shape_mismatch(type(model).__name__, given, path, module,
                                      got[0] if len(got) == 1 else got, run.error)


def analysis_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """A GraphModule for analysis, whose Python code is generated only when first needed.

    Tracing and slicing never run the generated code (they interpret the graph), so torch's
    lazy GraphModule saves a code generation and compile per model. Pruned models handed to
    users are made plain again (:func:`plain_module`): TorchScript does not take lazy ones.

    The graph forgets the :class:`Tracer` that built it (:func:`_forget_tracer`), so that this
    module and every copy or pruned version of it pickle like any GraphModule.
    """
    _forget_tracer(graph)
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # pragma: no cover - older torch
        return fx.GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)


def _forget_tracer(holder: Any) -> None:
    """Drop a :class:`Tracer` recorded on a graph or GraphModule (``_tracer_cls``).

    ``GraphModule.__reduce__`` stores only the generated code; unpickling re-traces that code
    with ``_tracer_cls()`` (no arguments) and every module a leaf. Our Tracer needs its rules,
    and re-tracing with it would not even be an identity: it decomposes an
    ``nn.MultiheadAttention`` that the user kept as a leaf. The generated code already holds
    every choice the Tracer made, so fx's own Tracer (the default when none is recorded)
    rebuilds exactly this graph.
    """
    cls = getattr(holder, "_tracer_cls", None)
    if isinstance(cls, type) and issubclass(cls, Tracer):
        holder._tracer_cls = None


def plain_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Make ``gm`` an ordinary ``fx.GraphModule`` (in place) with code for its current graph.

    A lazy module gets its own plain GraphModule class, as ``fx.GraphModule`` gives each
    instance, and then generates its code once; its submodules and tensors stay as they are.
    The result pickles, deep-copies and ``torch.save``-s like any GraphModule.
    """
    _forget_tracer(gm.graph)
    _forget_tracer(gm)
    if type(gm).__mro__[1] is not fx.GraphModule:
        name = type(gm).__name__
        gm.__class__ = type("GraphModuleImpl", (fx.GraphModule,), {})
        gm.__class__.__name__ = name
    # Unpickling names the rebuilt class after this (fx stores it only for torch.package).
    gm.__dict__["_graphmodule_cls_name"] = type(gm).__name__
    gm.recompile()
    return gm


def capture_export(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Capture ``model`` with ``torch.export.export(strict=False)`` as a plain ``GraphModule``.

    The export graph holds ATen ops (``aten.conv2d.default``), with every input size left open
    that the program does not fix (:func:`_auto_dynamic`; a graph's node and edge counts, a batch),
    in eval mode (BatchNorm reads its running statistics, dropout is off). Its
    parameters and buffers keep their qualified names and are the model's own tensors. The
    result takes the model's own arguments (nested inputs are unpacked with ``getitem``) and
    returns its output structure; ``gm.meta["structprune_capture"] == "export"``.
    """
    import warnings

    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = _export_dynamic(model, args, kwargs)
    epm = ep.module()
    graph = _plain_graph(epm.graph)
    _drop_unused(graph)
    gm = analysis_module(epm, graph, type(model).__name__)
    # Tensors the graph does not read (num_batches_tracked, unused layers) stay, so that the
    # state dict keeps the model's keys.
    adopt_tensors(gm, epm)
    gm.meta["structprune_capture"] = "export"
    return gm


def _export_dynamic(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``torch.export`` with every input size open that the program allows (:func:`_auto_dynamic`).

    Tried in order: non-strict export; strict export (TorchDynamo) with ``.item()`` captured as
    a symbolic value, which keeps a size computed from the data open (``int(batch.max()) + 1``,
    the number of graphs in a batch, which non-strict export cannot leave open); and last the
    example's sizes as they are. The first error is raised when all fail.
    """
    dynamic = _auto_dynamic(model, args, kwargs)
    attempts = [lambda: torch.export.export(model, tuple(args), dict(kwargs), strict=False,
                                            dynamic_shapes=dynamic),
                lambda: _export_strict(model, args, kwargs, dynamic),
                lambda: torch.export.export(model, tuple(args), dict(kwargs), strict=False)]
    first: Optional[BaseException] = None
    for attempt in attempts if dynamic is not None else attempts[2:]:
        try:
            return attempt()
        except Exception as exc:  # export raises many types
            first = first or exc
    assert first is not None
    raise first


def _export_strict(model: nn.Module, args: tuple, kwargs: dict, dynamic: Any) -> Any:
    import torch._dynamo

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        try:
            return torch.export.export(model, tuple(args), dict(kwargs), strict=True,
                                       dynamic_shapes=dynamic)
        finally:
            torch._dynamo.reset()


def _auto_dynamic(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``dynamic_shapes`` for ``torch.export`` that leaves every input dim open (``Dim.AUTO``).

    Export then keeps a dim symbolic unless the program fixes it (a ``Linear`` fixes the feature
    dim, a size of 0 or 1 is taken as it is), so the captured graph runs at any batch, sequence,
    image or graph size the model does, and the sizes it could not leave open are exactly the
    static ones in its placeholders' ``meta["val"]`` (what :func:`inputs.specialise` guards).
    """
    import inspect
    import torch.utils._pytree as pytree

    auto = torch.export.Dim.AUTO

    def spec(v: Any) -> Any:
        return pytree.tree_map(lambda t: {d: auto for d in range(t.dim())}
                               if isinstance(t, torch.Tensor) else None, v)

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return {name: spec(v) for name, v in bound.arguments.items()}


def adopt_tensors(gm: fx.GraphModule, src: nn.Module) -> None:
    """Give ``gm`` every parameter and buffer of ``src`` it lacks, under the same name.

    ``fx.GraphModule(root, graph)`` copies only the tensors the graph reads; this keeps the others
    (``num_batches_tracked``) so that the state dict has all of ``src``'s keys.
    """
    for qual, t in list(src.named_parameters()) + list(src.named_buffers()):
        path, _, name = qual.rpartition(".")
        owner: nn.Module = gm
        for part in path.split(".") if path else []:
            if not isinstance(getattr(owner, part, None), nn.Module):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if name in owner._parameters or name in owner._buffers or hasattr(owner, name):
            continue
        if isinstance(t, nn.Parameter):
            owner.register_parameter(name, t)
        else:
            src_owner = src.get_submodule(path) if path else src
            owner.register_buffer(name, t, persistent=name not in
                                  src_owner._non_persistent_buffers_set)


def _children(spec: Any) -> list:
    kids = getattr(spec, "children", None)
    return list(kids()) if callable(kids) else list(spec.children_specs)


def _plain_graph(old: fx.Graph) -> fx.Graph:
    """Copy an ``ep.module()`` graph into one with the default codegen.

    ``ep.module()`` takes the pytree-flattened leaves of ``(args, kwargs)``; here each model
    argument is one placeholder (named like the forward's parameter or the keyword) and nested
    ones are taken apart by ``getitem`` nodes that carry the old leaf placeholders' names. The
    ``_guards_fn`` call (it checks the input shapes) is left out.
    """
    import torch.utils._pytree as pytree

    info = old._codegen.pytree_info  # type: ignore[attr-defined]
    in_spec, out_spec = info.in_spec, info.out_spec
    args_spec, kwargs_spec = _children(in_spec)
    leaves = iter([n for n in old.nodes if n.op == "placeholder"])
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    n_pos = args_spec.num_children
    names = list(info.orig_args[:n_pos]) + [f"arg{i}" for i in range(len(info.orig_args), n_pos)]
    inputs = list(zip(names, _children(args_spec)))
    inputs += list(zip(kwargs_spec.context or [], _children(kwargs_spec)))
    taken = {n.name for n in old.nodes}

    def unpack(spec: Any, parent: fx.Node, label: str) -> None:
        for k, child in enumerate(_children(spec)):
            if spec.type in (dict, collections.OrderedDict):
                key = spec.context[k]
            elif spec.type in (tuple, list) or (isinstance(spec.type, type) and issubclass(
                    spec.type, tuple) and hasattr(spec.type, "_fields")):
                key = k
            else:
                raise TraceError(f"cannot take apart an input of type "
                                 f"{getattr(spec.type, '__name__', spec.type)}")
            if child.is_leaf():
                leaf = next(leaves)
                env[leaf] = graph.create_node("call_function", operator.getitem, (parent, key),
                                              name=leaf.name)
                env[leaf].meta = dict(leaf.meta)
            else:
                name = f"{label}_{key}"
                while name in taken:
                    name += "_"
                node = graph.create_node("call_function", operator.getitem, (parent, key),
                                         name=name)
                unpack(child, node, name)

    for name, spec in inputs:
        if spec.is_leaf():
            leaf = next(leaves)
            env[leaf] = graph.create_node("placeholder", name, name=leaf.name)
            env[leaf].meta = dict(leaf.meta)
        else:
            node = graph.placeholder(name)
            unpack(spec, node, name)
    for n in old.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "call_module" and str(n.target).startswith("_guards_fn"):
            continue
        if n.op == "output":
            flat = fx.map_arg(n.args[0], lambda a: env[a])
            _check_output_spec(out_spec)
            graph.output(pytree.tree_unflatten(list(flat), out_spec))
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    return graph


def _check_output_spec(spec: Any) -> None:
    """fx can return tuples, lists, dicts and None; other containers cannot be rebuilt."""
    if spec.is_leaf():
        return
    t = spec.type
    if t not in (tuple, list, dict, type(None)):
        raise TraceError(f"the model returns a {getattr(t, '__name__', t)}, which the exported "
                         f"graph cannot rebuild")
    for c in _children(spec):
        _check_output_spec(c)


def _drop_unused(graph: fx.Graph) -> None:
    """Remove pure nodes nobody reads (e.g. attention weights an MHA caller discards).

    In-place ops (``add_``, ``operator.iadd``) and module calls are kept whatever their users.
    """
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.users or n.op not in ("call_function", "call_method", "get_attr"):
                continue
            if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
                continue  # aten.add_.Tensor, aten.copy_.default, ...
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
            if name.endswith("_") or name.startswith("i") and name[1:] in _INPLACE_OPERATORS:
                continue
            if n.op == "call_function" and n.target in (operator.setitem, torch._assert):
                continue  # side effects: a write, an argument guard (graph/inputs.py)
            graph.erase_node(n)
            changed = True


_INPLACE_OPERATORS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
                      "lshift", "rshift", "matmul", "concat"}


def _shape_of(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.shape
    if isinstance(v, (tuple, list)) and v and any(isinstance(x, torch.Tensor) for x in v):
        return [x.shape if isinstance(x, torch.Tensor) else None for x in v]
    return None


def to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if isinstance(v, (tuple, list)):
        return type(v)(to_meta(x) for x in v)
    if isinstance(v, dict):
        return {k: to_meta(x) for k, x in v.items()}
    return v


def _like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` on the meta device without its Python decomposition."""
    if x.is_contiguous():
        return x.new_empty(x.shape)
    return torch.empty_like(x)


def _meta_fast_path(mod: nn.Module, args: Any, kwargs: Any) -> Any:
    """Output of common modules on meta inputs without their (slow) meta decompositions."""
    from ..ops.elementwise import _UNARY_MODULES

    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    cls = type(mod)
    if cls in _UNARY_MODULES or cls in _SAME_SHAPE:
        return _like(x)
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        out = _conv_shape(mod, x)
        if out is not None:
            return x.new_empty(out)
        b = mod.bias.to("meta") if mod.bias is not None else None
        return mod._conv_forward(x, mod.weight.to("meta"), b)
    if cls is nn.Linear:
        w, b = mod.weight, mod.bias
        if (x.dim() >= 1 and x.shape[-1] == w.shape[1] and w.dtype == x.dtype
                and (b is None or tuple(b.shape) == (w.shape[0],)) and x.is_contiguous()):
            return x.new_empty((*x.shape[:-1], w.shape[0]))
        b = b.to("meta") if b is not None else None
        return torch.nn.functional.linear(x, w.to("meta"), b)
    return None


def _conv_shape(mod: nn.Module, x: torch.Tensor) -> Optional[tuple[int, ...]]:
    """Output shape of a batched, contiguous, consistent ``nn.ConvNd`` call by its formula, or
    None where the meta kernel should decide (and raise, if the call is invalid)."""
    w, b = mod.weight, mod.bias
    nd = w.dim() - 2
    if (x.dim() != nd + 2 or x.shape[1] != w.shape[1] * mod.groups or w.dtype != x.dtype
            or not x.is_contiguous() or not w.is_contiguous()
            or (b is not None and tuple(b.shape) != (w.shape[0],))):
        return None
    if mod.padding == "same" or mod.padding_mode != "zeros":  # reflect pads have own limits
        return None
    pad = (0,) * nd if mod.padding == "valid" else tuple(mod.padding)
    spatial = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
        x.shape[2:], pad, mod.dilation, w.shape[2:], mod.stride))
    if any(n <= 0 for n in spatial):
        return None
    return (x.shape[0], w.shape[0], *spatial)


_SAME_SHAPE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU)
_F = torch.nn.functional
# Shape- and dtype-preserving on floating tensors whatever their keyword arguments say.
_META_UNARY = {_F.relu, torch.relu, torch.sigmoid, torch.tanh, _F.gelu, _F.silu, _F.hardswish,
               _F.hardsigmoid, _F.relu6, _F.dropout, "relu", "sigmoid", "tanh"}
_META_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                torch.mul, torch.div, "add", "sub", "mul", "div"}


_META_CAT = {torch.cat, torch.concat, torch.concatenate}


def _meta_cat(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``torch.cat`` of contiguous meta tensors of one dtype and rank whose other dims agree."""
    xs = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if (len(args) > 2 or set(kwargs) - {"tensors", "dim"} or not isinstance(xs, (list, tuple))
            or not xs or not isinstance(dim, int)):
        return None
    first = xs[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return None
    nd = first.dim()
    d = dim % nd if -nd <= dim < nd else None
    if d is None:
        return None
    shape = list(first.shape)
    shape[d] = 0
    for x in xs:
        if (not isinstance(x, torch.Tensor) or not x.is_meta or x.dtype != first.dtype
                or x.dim() != nd or not x.is_contiguous()
                or any(x.shape[k] != first.shape[k] for k in range(nd) if k != d)):
            return None
        shape[d] += x.shape[d]
    return first.new_empty(shape)


def _meta_elementwise(target: Any, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Output of plain float arithmetic on contiguous meta tensors, or None (take the slow path).

    With every tensor operand contiguous and of one floating dtype (Python numbers allowed),
    the result is a contiguous tensor of that dtype and the broadcast shape.
    """
    try:
        if target in _META_CAT:
            return _meta_cat(args, kwargs)
        if target not in _META_UNARY and target not in _META_BINARY:
            return None
    except TypeError:  # an unhashable target
        return None
    if target in _META_UNARY:
        x = args[0] if len(args) == 1 else None
        if (isinstance(x, torch.Tensor) and x.is_meta and x.is_floating_point()
                and x.is_contiguous()):
            return x.new_empty(x.shape)
        return None
    if kwargs or len(args) != 2:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(not isinstance(a, (torch.Tensor, int, float)) or isinstance(a, bool)
                          for a in args):
        return None
    dtype = tensors[0].dtype
    if not dtype.is_floating_point or any(
            t.dtype != dtype or not t.is_meta or not t.is_contiguous() for t in tensors):
        return None
    shape = tensors[0].shape if len(tensors) == 1 or tensors[0].shape == tensors[1].shape \
        else torch.broadcast_shapes(tensors[0].shape, tensors[1].shape)
    return tensors[0].new_empty(shape)


def _load_args(a: Any, env: dict) -> Any:
    """The values of a node's arguments: ``fx.node.map_arg`` over ``env``, fast for the
    plain containers fx puts in ``args``."""
    t = type(a)
    if t is fx.Node:
        return env[a]
    if t is tuple:
        return tuple([_load_args(x, env) for x in a])
    if t is fx.immutable_collections.immutable_list or t is list:
        return [_load_args(x, env) for x in a]
    if t is fx.immutable_collections.immutable_dict or t is dict:
        return {k: _load_args(v, env) for k, v in a.items()}
    if t is slice:
        return slice(_load_args(a.start, env), _load_args(a.stop, env), _load_args(a.step, env))
    if t in (int, float, bool, str, type(None)):
        return a
    return fx.node.map_arg(a, env.__getitem__)


class ShapeInterpreter(fx.Interpreter):
    """An fx Interpreter that can run on the meta device: shapes without arithmetic.

    With ``meta=True`` inputs are meta tensors and every module call and parameter read uses meta
    views of the (real) parameters, so a ResNet-50 runs in a fraction of a real forward pass.
    """

    def __init__(self, gm: fx.GraphModule, meta: bool = False) -> None:
        super().__init__(gm)
        self.meta = meta
        self._submodules = dict(gm.named_modules())

    def run_node(self, n: fx.Node) -> Any:
        """fx's ``run_node`` without its per-node logging and metadata context (not needed to
        compute values), with a direct lookup of the argument values."""
        env = self.env
        args = _load_args(n.args, env)
        kwargs = _load_args(n.kwargs, env) if n.kwargs else {}
        return getattr(self, n.op)(n.target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self._submodules.get(target)
        if mod is None:
            mod = self.fetch_attr(target)
        if not self.meta:
            return mod(*args, **kwargs)
        fast = _meta_fast_path(mod, args, kwargs)
        if fast is not None:
            return fast
        from torch.func import functional_call

        tensors = {k: v.to("meta") for k, v in list(mod.named_parameters())
                   + list(mod.named_buffers())}
        return functional_call(mod, tensors, args, kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._shortcut_or(super().call_function, target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._shortcut_or(super().call_method, target, args, kwargs)

    def _shortcut_or(self, call: Any, target: Any, args: Any, kwargs: Any) -> Any:
        fast = _meta_elementwise(target, args, kwargs) if self.meta else None
        return call(target, args, kwargs) if fast is None else fast

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().get_attr(target, args, kwargs)
        return to_meta(out) if self.meta else out

    def run_graph(self, inputs: list) -> Any:
        with torch.no_grad(), eval_mode(self.module):
            return self.run(*(to_meta(inputs) if self.meta else inputs))


class _Recorder(ShapeInterpreter):
    def __init__(self, gm: fx.GraphModule, meta: bool = False) -> None:
        super().__init__(gm, meta)
        self.shapes: dict[str, Any] = {}
        self.values: dict[str, Any] = {}
        self.current: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        out = super().run_node(n)
        self.shapes[n.name] = _shape_of(out)
        if not isinstance(out, torch.Tensor) and self.shapes[n.name] is None:
            self.values[n.name] = out
        return out


def placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """Order positional and keyword example inputs as the graph's placeholders expect."""
    out, i = [], 0
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        name = str(n.target).lstrip("*")
        if i < len(args):
            out.append(args[i])
            i += 1
        elif name in kwargs:
            out.append(kwargs[name])
        elif n.args:
            out.append(n.args[0])
        else:
            raise TraceError(f"no example input for the model's argument '{name}'")
    if i < len(args):
        raise TraceError(f"{len(args)} positional example inputs given, but the model's forward "
                         f"takes {i}")
    return out


def record_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict,
                  model_name: str = "model") -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``gm`` once; return ``(shapes, values)`` keyed by node name."""
    inputs = placeholder_values(gm, args, kwargs)
    try:  # shapes on the meta device first: no arithmetic
        rec = _Recorder(gm, meta=True)
        rec.run_graph(inputs)
        return rec.shapes, rec.values
    except Exception:  # data-dependent ops or missing meta kernels: run for real
        pass
    rec = _Recorder(gm)
    try:
        rec.run_graph(inputs)
    except Exception as exc:
        message = _input_mismatch(gm, rec, inputs, model_name, exc)
        raise TraceError(message) from (exc if diagnostics.debug_enabled() else None)
    return rec.shapes, rec.values


def _input_mismatch(gm: fx.GraphModule, rec: _Recorder, inputs: list, model_name: str,
                    exc: BaseException) -> str:
    """One line for a graph that fails on the example inputs: the example inputs the failing
    node depends on, with their shapes, and the module that rejected them and what it expects."""
    n = rec.current
    if n is None:
        return diagnostics.shape_mismatch(model_name, {}, None, None, None, exc)
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    seen, todo = set(), [n]
    while todo:  # the example inputs this node reads, directly or not
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += m.all_input_nodes
    given = {str(p.target).lstrip("*"): v for p, v in zip(placeholders, inputs) if p in seen}
    path, module = None, None
    if n.op == "call_module":
        path = str(n.target)
        module = gm.get_submodule(path)
    elif n.meta.get("nn_module_stack"):  # an export graph: the innermost module it ran in
        path = str(list(n.meta["nn_module_stack"].values())[-1][0]) or None
    args = [rec.env[a] for a in n.args if isinstance(a, fx.Node) and a in rec.env]
    got = args[0] if len(args) == 1 else args
    return diagnostics.shape_mismatch(model_name, given, path, module, got, exc,
                                      node=f"%{n.name}")
