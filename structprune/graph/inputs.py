"""The model's non-tensor arguments: specialised where the graph cannot honour them, and then
guarded, so that a pruned model never quietly computes something else.

A forward like ``forward(self, x, scale: float = 2.0, mode: str = "sum", extra=None)`` is
captured on its example values. ``torch.fx`` keeps a float or int argument symbolic where the
code only computes with it (``h * scale``); strings, bools and ``None`` steer Python control flow
and are traced as constants (fx's ``concrete_args``), and ``torch.export`` makes every
non-tensor argument a constant. :func:`specialise` then makes the captured graph keep the
model's signature (names and defaults) and adds, for every argument the graph does not read, a
check that the call passes the value the model was pruned for::

    torch._assert(operator.eq(mode, 'sum'), "... was pruned for mode='sum' ...")

Calling the pruned model with another value raises that message; the defaults make ``p(x)``
work where the original's did. A pruned model of the user's own class gets the same check as a
forward pre-hook (:func:`add_guard_hook`).
"""
from __future__ import annotations

import ast
import functools
import inspect
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TraceError

_ATOMS = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _atomic(v: Any) -> bool:
    return isinstance(v, _ATOMS) or (type(v) in (tuple, list) and all(_atomic(x) for x in v))


def _signature(model: nn.Module) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _plain_params(sig: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def example_values(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{parameter name: value}`` for every plain forward parameter: the example input where
    one is given, else its default (parameters with neither are left out); keyword inputs
    that a ``**kwargs`` parameter takes by their own names."""
    sig = _signature(model)
    if sig is None or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return {}
    out: dict[str, Any] = {}
    params = _plain_params(sig)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):  # **kwargs: by key
        names = {p.name for p in params}
        out.update({k: v for k, v in kwargs.items() if k not in names})
    for i, p in enumerate(params):
        if i < len(args) and p.kind != p.KEYWORD_ONLY:
            out[p.name] = args[i]
        elif p.name in kwargs:
            out[p.name] = kwargs[p.name]
        elif p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out


def _given(model: nn.Module, args: tuple, kwargs: dict) -> set[str]:
    """Names of the forward parameters the example inputs pass (not left to their defaults)."""
    sig = _signature(model)
    if sig is None:
        return set(kwargs)
    positional = [p.name for p in _plain_params(sig) if p.kind != p.KEYWORD_ONLY]
    return set(positional[:len(args)]) | set(kwargs)


def concrete_args(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments fx should trace as constants: ``None``, bools and strings (they steer
    Python control flow; a ``Proxy`` would take the wrong branch of ``if extra is not None``)."""
    return {k: v for k, v in example_values(model, args, kwargs).items()
            if v is None or isinstance(v, (bool, str))}


def capture_guarded(model: nn.Module, rules: dict, leaf_modules: Any, args: tuple, kwargs: dict,
                    with_inputs: bool = True) -> fx.GraphModule:
    """:func:`structprune.graph.capture.capture` with the non-tensor arguments handled: fx traces
    ``None``/bool/str as constants, and :func:`specialise` guards what the graph fixed. Values
    a pruned model of the user's class was pruned for (its guard hook) are fixed and guarded
    again, whatever the example inputs say. ``with_inputs=False``: fx only (no export
    fallback), the arguments' defaults standing in for the example."""
    from .capture import capture

    pinned = guarded_values(model)
    values = {**example_values(model, args, kwargs), **pinned}
    concrete = {k: v for k, v in values.items() if v is None or isinstance(v, (bool, str))}
    gm = capture(model, rules, leaf_modules, concrete_args=concrete or None,
                 example_inputs=(args, kwargs) if with_inputs else None)
    specialise(gm, model, args, kwargs, concrete, pinned)
    return gm


def guarded_values(model: nn.Module) -> dict[str, Any]:
    """The argument values ``model``'s guard hook (:func:`add_guard_hook`) insists on."""
    for h in model._forward_pre_hooks.values():
        if isinstance(h, functools.partial) and h.func is _guard_hook:
            return dict(h.args[0])
    return {}


def specialise(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict,
               concrete: dict[str, Any], pinned: Optional[dict[str, Any]] = None) -> None:
    """Give ``gm`` the model's parameter names and defaults, and a guard for every non-tensor
    argument it does not read (see the module docstring). Records the guarded values in
    ``gm.meta["structprune_specialised"]``.

    Raises:
        TraceError: an argument the graph does not read holds a value that cannot be checked
            at call time (not None/bool/int/float/str/dtype/device or a tuple of them).
    """
    pinned = pinned or {}
    values = {**example_values(model, args, kwargs), **pinned}
    sig = _signature(model)
    exported = gm.meta.get("structprune_capture") == "export"
    if sig is None or not values:
        gm.meta["structprune_specialised"] = {}
        return
    defaults = {p.name: p.default for p in _plain_params(sig)}
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for n in placeholders:  # fx names a concrete argument's placeholder 'mode_1'
        base = str(n.target)
        if base not in defaults and base.rpartition("_")[0] in concrete:
            base = base.rpartition("_")[0]
            _erase_users(n)  # fx's own assertion on the constant: replaced by ours below
            n.target = base
    _add_missing_placeholders(graph, placeholders, _plain_params(sig), values)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    guarded: dict[str, Any] = {}
    leaves: list[tuple[fx.Node, tuple, Any]] = []  # non-tensor items of nested inputs (export)
    for n in placeholders:
        name = str(n.target)
        if name in defaults and defaults[name] is not inspect.Parameter.empty and not n.args:
            if _atomic(defaults[name]):
                n.args = (defaults[name],)
        if name not in values or isinstance(values[name], torch.Tensor):
            continue
        if n.users and name not in pinned:
            if exported and _holds_tensor(values[name]):
                leaves.extend((n, path, v) for path, v in _constant_leaves(values[name]))
            continue
        v = values[name]
        if _holds_tensor(v):
            continue
        if not _atomic(v) and name not in _given(model, args, kwargs):
            continue  # a default the user did not pass, and we cannot check: left as it is
        if not _atomic(v):
            raise TraceError(
                f"{type(model).__name__}: argument '{name}' ({type(v).__name__}) is fixed to its "
                f"example value in the captured graph, and structprune can only check None, "
                f"bool, int, float, str, dtype, device or tuples of them at call time. Bind it "
                f"outside the model (functools.partial, a wrapper module) or pass a tensor.")
        if isinstance(v, float) and math.isnan(v):
            continue
        guarded[name] = v
    _defaults_in_order(placeholders, defaults)
    if exported:
        _guard_shapes(gm, placeholders, values, type(model).__name__)
    if leaves:
        _guard_leaves(gm, placeholders[-1], leaves, type(model).__name__)
    if guarded:
        last = placeholders[-1]
        with graph.inserting_after(last):
            for name, v in reversed(list(guarded.items())):
                ph = next(n for n in placeholders if n.target == name)
                test = (operator.is_, (ph, None)) if v is None else (operator.eq, (ph, v))
                cond = graph.call_function(*test)
                msg = _message(type(model).__name__, name, v)
                with graph.inserting_after(cond):
                    graph.call_function(torch._assert, (cond, msg))
        gm.recompile()
    gm.meta["structprune_specialised"] = guarded


def _defaults_in_order(placeholders: list[fx.Node], named: dict[str, Any]) -> None:
    """Keep the generated signature valid Python: no argument without a default after one with.

    A keyword input that ``**kwargs`` takes follows the named parameters; leaving it out is
    what ``kwargs.get(name)`` reads as None, so None is its default (a guard then refuses the
    call where the graph was captured for another value). Should a named parameter without a
    default still follow a defaulted one, the defaults before it are dropped."""
    seen_default = False
    for k, n in enumerate(placeholders):
        if n.args:
            seen_default = True
        elif seen_default:
            if str(n.target) not in named:
                n.args = (None,)
            else:
                for m in placeholders[:k]:
                    m.args = ()
                seen_default = False


def _guard_shapes(gm: fx.GraphModule, placeholders: list[fx.Node], values: dict[str, Any],
                  model_name: str) -> None:
    """A torch.export graph computes only the input sizes it was captured for: the ones the
    program fixed (a ``Linear``'s features; a batch or length baked into a ``view``, where
    another size of the same element count would silently mix rows) and, for the sizes it left
    open, the range export assumed (``>= 2``: a size of 1 may broadcast differently). Check
    those at call time, naming the input and the size it accepts."""
    graph = gm.graph
    after = placeholders[-1]

    def emit(fn: Any, *args: Any) -> fx.Node:
        nonlocal after
        args = tuple(after if a is None else a for a in args)
        node = graph.call_function(fn, args)
        after.append(node)
        after = node
        return node

    checked: set[tuple[str, int, int]] = set()  # (input, dim, size) the checks below cover
    for ph in placeholders:
        v = values.get(str(ph.target))
        if not isinstance(v, torch.Tensor):
            continue
        fixed, lower = _captured_sizes(ph, v)
        checked |= {(str(ph.target), d, n) for d, n in enumerate(fixed) if n is not None}
        where = f"this pruned {model_name} was captured by torch.export"
        if all(n is not None for n in fixed):
            msg = (f"{where} for input '{ph.target}' of shape {tuple(fixed)} and computes only "
                   f"that shape; prune again with example inputs of the shape you need")
            shape = emit(getattr, ph, "shape")
            emit(torch._assert, emit(operator.eq, shape, tuple(fixed)), msg)
            continue
        shape = emit(getattr, ph, "shape")
        emit(torch._assert, emit(operator.eq, emit(getattr, ph, "ndim"), len(fixed)),
             f"{where} for {len(fixed)}-d input '{ph.target}'")
        for d, n in enumerate(fixed):
            if n is not None:
                emit(torch._assert, emit(operator.eq, emit(operator.getitem, shape, d), n),
                     f"{where} for input '{ph.target}' with size {n} in dim {d} (its other sizes "
                     f"are free); prune again with example inputs of the size you need")
            elif lower.get(d, 0) > 1:
                emit(torch._assert, emit(operator.ge, emit(operator.getitem, shape, d), lower[d]),
                     f"{where} for input '{ph.target}' with at least {lower[d]} entries in dim "
                     f"{d}; a smaller size may broadcast differently")
    by_name: dict[str, Any] = {str(ph.target): ph for ph in placeholders}
    nodes = {n.name: n for n in graph.nodes}
    flat = [nodes.get(name) for name in gm.meta.get("structprune_flat_inputs", ())]
    if all(n is not None for n in flat):
        by_name.setdefault("flat_args", flat)
    for code in gm.meta.get("structprune_guards", ()):
        if _size_equality(code) in checked:
            continue  # a fixed size, checked above with a message that names it
        try:
            cond = _guard_node(ast.parse(code, mode="eval").body, by_name, emit)
        except (SyntaxError, ValueError, KeyError):
            raise TraceError(f"{model_name}: torch.export captured it under the condition "
                             f"{code!r} on its input sizes, which structprune cannot check "
                             f"at call time") from None
        emit(torch._assert, cond, f"this pruned {model_name} was captured by torch.export for "
                                  f"inputs with {code.replace('L[', '[')}, which these inputs "
                                  f"break; prune again with example inputs like them")
    gm.recompile()


def _size_equality(code: str) -> Optional[tuple[str, int, int]]:
    """``(input, dim, size)`` for a guard that is just ``L['x'].size()[d] == n``, else None."""
    try:
        e = ast.parse(code, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(e, ast.Compare) and len(e.ops) == 1 and isinstance(e.ops[0], ast.Eq)
            and isinstance(e.comparators[0], ast.Constant)):
        return None
    left = e.left  # L['x'].size()[d]
    try:
        call = left.value  # type: ignore[attr-defined]
        name = ast.literal_eval(call.func.value.slice)
        assert isinstance(call.func.value.value, ast.Name) and call.func.value.value.id == "L"
        return str(name), int(ast.literal_eval(left.slice)), int(e.comparators[0].value)
    except (AttributeError, ValueError, AssertionError, TypeError):
        return None


class _AnyInputs(dict):
    """For :func:`guard_checkable`: every input name stands for a placeholder."""

    def __missing__(self, key: str) -> Any:
        return [object()] * 4096 if key == "flat_args" else object()


def guard_checkable(code: str) -> bool:
    """Whether :func:`_guard_node` can turn one of export's guard expressions into graph
    nodes (``capture_export`` captures with the example's sizes when it cannot)."""
    try:
        _guard_node(ast.parse(code, mode="eval").body, _AnyInputs(), lambda *a: object())
    except (SyntaxError, ValueError, KeyError, IndexError, TypeError):
        return False
    return True


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.Div: operator.truediv, ast.BitAnd: operator.and_, ast.BitOr: operator.or_}
#: Functions export's guards call on sizes (``math.ceil(H / 2)``, ``torch.sym_max(7, W // 32)``),
#: by (module, name), with the plain-number function that computes the same at call time.
_GUARD_CALLS = {("math", "ceil"): math.ceil, ("math", "floor"): math.floor,
                ("math", "trunc"): math.trunc, ("math", "sqrt"): math.sqrt,
                ("torch", "sym_max"): max, ("torch", "sym_min"): min,
                ("torch", "sym_float"): float, ("torch", "sym_int"): int,
                ("torch", "sym_sqrt"): math.sqrt, ("torch", "sym_not"): operator.not_,
                (None, "int"): int, (None, "float"): float, (None, "abs"): abs,
                (None, "max"): max, (None, "min"): min}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge}


def _call_name(f: ast.AST) -> Optional[tuple[Optional[str], str]]:
    """``("math", "ceil")`` for ``math.ceil``, ``(None, "int")`` for ``int``, else None."""
    if isinstance(f, ast.Name):
        return None, f.id
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f.value.id, f.attr
    return None


def _guard_node(e: ast.AST, inputs: dict[str, fx.Node], emit: Any) -> Any:
    """One of ``torch.export``'s guard expressions (``L['x'].size()[3] <= 4``) as graph nodes
    of plain operators on the inputs' sizes; ValueError for any other syntax."""
    if isinstance(e, ast.Constant) and isinstance(e.value, (int, float, bool)):
        return e.value
    if isinstance(e, ast.Subscript):
        if isinstance(e.value, ast.Name) and e.value.id == "L":
            return inputs[ast.literal_eval(e.slice)]
        base, key = _guard_node(e.value, inputs, emit), ast.literal_eval(e.slice)
        return base[key] if isinstance(base, list) else emit(operator.getitem, base, key)
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and not e.args \
            and e.func.attr == "size":
        return emit(getattr, _guard_node(e.func.value, inputs, emit), "shape")
    if isinstance(e, ast.Call) and not e.keywords and _call_name(e.func) in _GUARD_CALLS:
        # ``torch.sym_max(7, W // 32)`` (an adaptive pool's window), ``math.ceil(H / 2)``: the
        # sizes are plain ints at call time, so the plain function
        return emit(_GUARD_CALLS[_call_name(e.func)],
                    *[_guard_node(a, inputs, emit) for a in e.args])
    if isinstance(e, ast.BinOp) and type(e.op) in _BINOPS:
        return emit(_BINOPS[type(e.op)], _guard_node(e.left, inputs, emit),
                    _guard_node(e.right, inputs, emit))
    if isinstance(e, ast.UnaryOp) and isinstance(e.op, (ast.USub, ast.Not)):
        fn = operator.neg if isinstance(e.op, ast.USub) else operator.not_
        return emit(fn, _guard_node(e.operand, inputs, emit))
    if isinstance(e, ast.Compare) and all(type(o) in _CMPOPS for o in e.ops):
        terms = [_guard_node(x, inputs, emit) for x in [e.left] + e.comparators]
        out = None
        for op, a, b in zip(e.ops, terms, terms[1:]):
            c = emit(_CMPOPS[type(op)], a, b)
            out = c if out is None else emit(operator.and_, out, c)
        return out
    if isinstance(e, ast.BoolOp):
        fn = operator.and_ if isinstance(e.op, ast.And) else operator.or_
        out = _guard_node(e.values[0], inputs, emit)
        for v in e.values[1:]:
            out = emit(fn, out, _guard_node(v, inputs, emit))
        return out
    raise ValueError(ast.dump(e))


def _captured_sizes(ph: fx.Node, v: torch.Tensor) -> tuple[list[Optional[int]], dict[int, int]]:
    """The sizes of input ``ph`` that the captured graph fixed (None where it left a dim open)
    and the lower bounds export assumed for the open ones."""
    val = ph.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != v.dim():
        return list(v.shape), {}
    fixed: list[Optional[int]] = []
    lower: dict[int, int] = {}
    for d, s in enumerate(val.shape):
        n = s.node.maybe_as_int() if isinstance(s, torch.SymInt) else int(s)
        fixed.append(n)
        if n is None:
            expr = s.node.expr
            vr = s.node.shape_env.var_to_range.get(expr)
            lo = getattr(vr, "lower", None) if vr is not None else None
            lower[d] = int(lo) if lo is not None and getattr(lo, "is_number", False) else 2
    return fixed, lower


def _constant_leaves(v: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """``[(path, value)]`` of the non-tensor leaves of a nested dict/list/tuple input."""
    if isinstance(v, dict):
        return [x for k, item in v.items() for x in _constant_leaves(item, path + (k,))]
    if isinstance(v, (list, tuple)):
        return [x for k, item in enumerate(v) for x in _constant_leaves(item, path + (k,))]
    return [] if isinstance(v, torch.Tensor) else [(path, v)]


def _guard_leaves(gm: fx.GraphModule, after: fx.Node, leaves: list[tuple[fx.Node, tuple, Any]],
                  model_name: str) -> None:
    """Guard the non-tensor items of nested inputs that torch.export fixed (``batch["flag"]``):
    ``getitem`` down to the item, then the same check as a plain argument."""
    graph = gm.graph
    for ph, path, v in leaves:
        where = str(ph.target) + "".join(f"[{k!r}]" for k in path)
        if not _atomic(v):
            raise TraceError(
                f"{model_name}: input item {where} ({type(v).__name__}) is fixed to its example "
                f"value in the captured graph and cannot be checked at call time; pass it as a "
                f"tensor or bind it outside the model.")
        if isinstance(v, float) and math.isnan(v):
            continue
        node = ph
        steps = [(operator.getitem, (k,)) for k in path]
        steps.append((operator.is_, (None,)) if v is None else (operator.eq, (v,)))
        for fn, rest in steps:
            new = graph.call_function(fn, (node, *rest))
            after.append(new)
            after = node = new
        check = graph.call_function(torch._assert, (node, _message(model_name, where, v)))
        after.append(check)
        after = check
    gm.recompile()


def _add_missing_placeholders(graph: fx.Graph, placeholders: list[fx.Node],
                              params: list[inspect.Parameter], values: dict[str, Any]) -> None:
    """Give every forward parameter with an example value or default a placeholder, in the
    signature's order (torch.export leaves out arguments the example did not pass)."""
    have = {str(n.target): n for n in placeholders}
    if len(have) != len(placeholders) or not set(have) <= {p.name for p in params}:
        return  # a signature we do not recognise (nested inputs, renamed arguments)
    prev: Optional[fx.Node] = None
    for p in params:
        n = have.get(p.name)
        if n is None:
            if p.name not in values or not _atomic(values[p.name]):
                continue
            with graph.inserting_before(next(iter(graph.nodes))):
                n = graph.placeholder(p.name)
        if prev is not None and n.prev is not prev:
            prev.append(n)
        elif prev is None and n is not next(iter(graph.nodes)):
            next(iter(graph.nodes)).prepend(n)
        prev = n


def _message(model_name: str, name: str, value: Any) -> str:
    return (f"this pruned {model_name} was captured for {name}={value!r} (the example input "
            f"or default) and computes only that case; it was called with another {name}. "
            f"Prune again with that value in the example inputs.")


def _holds_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (tuple, list)):
        return any(_holds_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_holds_tensor(x) for x in v.values())
    return False


def _erase_users(n: fx.Node) -> None:
    """Erase every node that depends on ``n`` (fx's assertion chain on a concrete argument)."""
    todo = list(n.users)
    order: list[fx.Node] = []
    while todo:
        u = todo.pop()
        if u not in order:
            order.append(u)
            todo += list(u.users)
    for u in reversed(sorted(order, key=lambda x: list(n.graph.nodes).index(x))):
        n.graph.erase_node(u)


def _check_call(specialised: dict[str, Any], model_name: str, module: nn.Module, args: tuple,
                kwargs: dict) -> None:
    sig = _signature(module)
    if sig is None:
        return
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return  # forward itself will say what is wrong with the call
    bound.apply_defaults()
    for name, want in specialised.items():
        if name in bound.arguments:
            got = bound.arguments[name]
            same = got is None if want is None else (not isinstance(got, torch.Tensor)
                                                     and got == want)
            if not same:
                raise AssertionError(_message(model_name, name, want))


def add_guard_hook(model: nn.Module, specialised: dict[str, Any]) -> None:
    """Check, before every call of ``model``, that the specialised arguments have the values
    the model was pruned for (a picklable forward pre-hook; added once)."""
    if not specialised:
        return
    for h in model._forward_pre_hooks.values():
        if isinstance(h, functools.partial) and h.func is _guard_hook:
            return
    model.register_forward_pre_hook(
        functools.partial(_guard_hook, dict(specialised), type(model).__name__), with_kwargs=True)


def _guard_hook(specialised: dict[str, Any], model_name: str, module: nn.Module, args: tuple,
                kwargs: dict) -> None:
    _check_call(specialised, model_name, module, args, kwargs)
