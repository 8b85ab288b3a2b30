"""Capture a model with ``torch.export`` where fx symbolic tracing cannot.

:func:`capture_export` exports the model on its example inputs with every input size left open
that the program allows (a graph's node and edge counts, a batch) and turns the exported program
into a plain ``GraphModule`` of ATen ops (their rules live in ``ops/aten.py``) that takes the
model's own arguments and keeps its parameters' names.
"""
from __future__ import annotations

import collections
import contextlib
import operator
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TraceError
from ..modes import eval_mode
from ..model_output import build_output, output_path
from .modules import _drop_unused, analysis_module


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

    from .inputs import guard_checkable

    with eval_mode(model), warnings.catch_warnings(), _dropped_outputs(model, args,
                                                                       kwargs) as dropped:
        warnings.simplefilter("ignore")
        ep = _export_dynamic(model, args, kwargs)
        if not all(guard_checkable(c) for c in getattr(ep, "_guards_code", None) or []):
            # a condition on the sizes that cannot be checked at call time: the example's sizes
            ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
        epm = ep.module()
        graph = _plain_graph(epm.graph)
    _drop_unused(graph)
    gm = analysis_module(epm, graph, type(model).__name__)
    # Tensors the graph does not read (num_batches_tracked, unused layers) stay, so that the
    # state dict keeps the model's keys.
    adopt_tensors(gm, epm)
    _restore_train_modules(gm, model)
    gm.meta["structprune_capture"] = "export"
    # outputs the graph cannot hold (a key/value cache object), returned as None
    gm.meta["structprune_dropped_outputs"] = sorted(t.__name__ for t in dropped)
    # The conditions on the input sizes the program was captured under (``W <= 4`` from a
    # branch, ``H * W == 16`` from an ``int()``): ``_guards_fn`` is left out of the graph, and
    # ``inputs._guard_shapes`` checks these instead.
    gm.meta["structprune_guards"] = list(getattr(ep, "_guards_code", None) or [])
    # a strict export names the inputs L['flat_args'][k]: the k-th leaf, by its node's name
    gm.meta["structprune_flat_inputs"] = [n.name for n in epm.graph.nodes
                                          if n.op == "placeholder"]
    return gm


def _innermost_module(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    entries = [v for v in stack.values() if isinstance(v, tuple) and v and v[0]]
    return str(entries[-1][0]) if entries else ""


def _restore_train_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    """Calls of the model's ``BatchNorm`` and ``Dropout`` modules back as module calls.

    Export runs in eval mode and writes them as ``aten.batch_norm(..., training=False)`` and
    ``aten.dropout(x, p, False)``; as calls of the modules themselves (the same objects, with
    the same tensors) they follow ``.train()`` / ``.eval()`` as in the original, so a pruned
    graph fine-tunes with batch statistics and dropout. A call that is not exactly its
    module's (other arguments, a functional call inside another module) stays as it is.
    """
    aten = torch.ops.aten
    changed = False
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in (aten.batch_norm.default,
                                                       aten.dropout.default):
            continue
        path = _innermost_module(n)
        try:
            m = model.get_submodule(path) if path else None
        except AttributeError:
            continue
        if n.target is aten.batch_norm.default:
            ok = (isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward in (
                nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward)
                and _reads(n.args[1:5], path, ("weight", "bias", "running_mean",
                                               "running_var"), m))
        else:
            ok = isinstance(m, nn.Dropout) and type(m).forward is nn.Dropout.forward and \
                n.args[1] == m.p
        if not ok:
            continue
        gm.add_submodule(path, m)  # with the containers on its path (a ModuleList of them)
        with gm.graph.inserting_before(n):
            call = gm.graph.call_module(path, (n.args[0],))
        call.meta = dict(n.meta)
        n.replace_all_uses_with(call)
        gm.graph.erase_node(n)
        changed = True
    if changed:
        _drop_unused(gm.graph)
        gm.recompile()


def _reads(args: Any, path: str, names: tuple, m: nn.Module) -> bool:
    """Whether ``args`` are the ``get_attr`` nodes of ``m``'s tensors ``names`` (or None where
    ``m`` has none)."""
    for a, name in zip(args, names):
        if getattr(m, name, None) is None:
            if a is not None:
                return False
        elif not (isinstance(a, fx.Node) and a.op == "get_attr"
                  and a.target == f"{path}.{name}"):
            return False
    return True


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


#: Seconds the strict (TorchDynamo) attempt may take. On a torchvision detector it spends
#: minutes in sympy and then crashes the process (a segfault); the other attempts fail fast.
STRICT_EXPORT_SECONDS = 45.0


class _OutOfTime(Exception):
    pass


@contextlib.contextmanager
def _time_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`_OutOfTime` in the block after ``seconds`` (a ``SIGALRM`` timer, only in
    the main thread of a POSIX process with no timer of its own running; else no budget)."""
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, "setitimer") or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def out_of_time(signum: int, frame: Any) -> None:
        raise _OutOfTime(f"torch.export (strict) took more than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _export_strict(model: nn.Module, args: tuple, kwargs: dict, dynamic: Any) -> Any:
    """Strict export on copies of the example tensors: TorchDynamo marks the tensors it was
    given as dynamic (``_dynamo_weak_dynamic_indices``), and a later export of the same tensors
    (the example's sizes, the last attempt) would then solve for open sizes again."""
    import torch._dynamo
    import torch.utils._pytree as pytree

    args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, (tuple(args), kwargs))
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        try:
            with _time_budget(STRICT_EXPORT_SECONDS):
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
            flat = iter(fx.map_arg(n.args[0], lambda a: env[a]))
            graph.output(_rebuild_output(graph, out_spec, flat))
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    return graph


_IMMUTABLE = {fx.immutable_collections.immutable_dict: dict,
              fx.immutable_collections.immutable_list: list}


def _rebuild_output(graph: fx.Graph, spec: Any, leaves: Any) -> Any:
    """The model's output structure over the graph's output leaves.

    Tuples, lists, dicts and None are fx's own (fx's immutable dicts and lists become plain
    ones). A dataclass (a Hugging Face ``ModelOutput``) or a named tuple is built by a call of
    its class in the graph, with the fields the example returned; a type whose leaves were
    dropped (:func:`_dropped_outputs`) is ``None``. Other containers are refused.
    """
    import dataclasses

    if spec.is_leaf():
        return next(leaves)
    t = _IMMUTABLE.get(spec.type, spec.type)
    kids = [_rebuild_output(graph, c, leaves) for c in _children(spec)]
    if t in _DROPPED:
        return None
    if t in (tuple, list):
        return t(kids)
    if t in (dict, collections.OrderedDict) or (dataclasses.is_dataclass(t) and isinstance(
            spec.context, (list, tuple))):
        fields = dict(zip(spec.context, kids))
        if t in (dict, collections.OrderedDict):
            return fields
        return graph.call_function(build_output, (output_path(t),), fields)
    if t is type(None):
        return None
    if isinstance(spec.context, type) and issubclass(spec.context, tuple) and hasattr(
            spec.context, "_fields"):  # pytree keeps a named tuple's class as its context
        return graph.call_function(build_output, (output_path(spec.context), *kids))
    if isinstance(t, type) and issubclass(t, tuple) and hasattr(t, "_fields"):
        return graph.call_function(build_output, (output_path(t), *kids))
    raise TraceError(f"the model returns a {getattr(t, '__name__', t)}, which the exported "
                     f"graph cannot rebuild")


# Output types :func:`_dropped_outputs` has registered for the export under way.
_DROPPED: set = set()


@contextlib.contextmanager
def _dropped_outputs(model: nn.Module, args: tuple, kwargs: dict) -> Iterator[set]:
    """Let ``torch.export`` capture a model whose output holds objects it cannot flatten (a
    Hugging Face ``DynamicCache``: keys and values of the attention for the next call).

    Such a type is registered, for the duration of the block, as a container with no leaves:
    the graph leaves it out, and :func:`_rebuild_output` returns ``None`` in its place (the
    capture's ``meta["structprune_dropped_outputs"]`` names it). The model is run once on the
    example inputs to find such types (one eager forward, beside export's own traces).
    """
    import torch.utils._pytree as pytree

    found: set = set()
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    except Exception:  # the export will say why
        out = None
    _unknown_types(out, found, pytree)
    found -= _DROPPED
    for t in found:
        pytree.register_pytree_node(t, lambda obj: ([], None), lambda leaves, ctx: None)
        _DROPPED.add(t)
    try:
        yield found
    finally:
        for t in found:
            pytree._deregister_pytree_node(t)
            _DROPPED.discard(t)


def _unknown_types(value: Any, found: set, pytree: Any) -> None:
    """The types in ``value`` (at any depth) that are neither leaves torch.export handles nor
    containers pytree can take apart."""
    for leaf in pytree.tree_leaves(value):
        if not (leaf is None or isinstance(leaf, (torch.Tensor, int, float, bool, str))):
            found.add(type(leaf))
