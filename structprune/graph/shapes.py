"""Shape records: every node's output shape and the non-tensor values sizes are built from.

``record_shapes`` runs the graph once on the example inputs (on the meta device where it can,
:class:`ShapeInterpreter`) and keeps every node's output shape (nested, for a node that outputs
tuples, lists or dicts of tensors) and every non-tensor value (``x.size(0)``, ``H // 2``) that
shape arguments are built from.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from .. import diagnostics
from ..errors import TraceError
from ..modes import eval_mode
from ..rules import ShapeRecord
from .fast_paths import _meta_elementwise, _meta_fast_path


def shape_record(v: Any) -> ShapeRecord:
    """The shape record of a value (:data:`~structprune.rules.ShapeRecord`): its shape for a
    tensor; for a tuple/list or dict holding tensors at any depth, a list or dict of its items'
    records (``(out, (edge_index, alpha))`` -> ``[Size, [Size, Size]]``); else None."""
    if isinstance(v, torch.Tensor):
        return v.shape
    if isinstance(v, (tuple, list)) and not isinstance(v, torch.Size):
        items = [shape_record(x) for x in v]
        return items if any(x is not None for x in items) else None
    if isinstance(v, dict) and all(type(k) in (int, str) for k in v):
        record = {k: shape_record(x) for k, x in v.items()}
        return record if any(x is not None for x in record.values()) else None
    return None


def to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if isinstance(v, (tuple, list)):
        return type(v)(to_meta(x) for x in v)
    if isinstance(v, dict):
        return {k: to_meta(x) for k, x in v.items()}
    return v


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
        if self.meta and kwargs.get("device") is not None:
            # A factory with an explicit device (``zeros(n, device=cpu)``) would make a real
            # tensor among meta ones, and e.g. a CPU ``scatter_add_`` with a meta index leaves
            # it unchanged without an error: every value on the meta run stays meta.
            kwargs = {**kwargs, "device": torch.device("meta")}
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
        self.shapes[n.name] = shape_record(out)
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
