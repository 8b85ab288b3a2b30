"""Save and load a (pruned) model without its original code and without pickle.

The file is one safetensors file: the tensors (parameters, buffers, tensor constants) plus, in its
metadata, a JSON spec of the module tree (class path and plain attributes of every submodule),
of the fx graph (op, target, args of every node), of every nested ``GraphModule`` (the branches
of higher-order ops such as ``wrap_with_autocast`` or ``cond`` in graphs captured by
``torch.export``), of the graph's ``structprune_*`` metadata (how it was captured, the argument
values it was specialised to) and, for a ``torch.export`` capture, of which input sizes are open
(a GNN's node and edge counts), so that a loaded model still exports to ONNX with those axes
open. A captured graph is stored as it is: saving a pruned ``GraphModule`` never re-traces.

What a file may name (classes, functions) is an allow-list, :data:`ALLOWED`: ``torch``,
``operator``, ``math``, ``builtins`` (less ``eval``, ``exec``, ``open`` and their kin),
``torch_geometric`` and ``structprune``, plus registered operators (``torch.ops.aten.conv2d.
default``, ``torch.ops.higher_order.cond``). Loading imports no module outside it and refuses a
file that names anything else; :func:`allow` adds a package or one object you trust.

A module's attributes are what its class's own ``__getstate__`` gives (as for pickle), and they
are put back through its ``__setstate__``: derived state is rebuilt by the class itself (an
``nn.LSTM`` re-creates its weight references there). Attributes that hold the model's own
tensors (``nn.LSTM._flat_weights``) are stored as references to them by qualified name.
"""
from __future__ import annotations

import importlib
import json
import math
import reprlib
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import StructpruneError

FORMAT = "structprune/1"
_BASE_KEYS = set(nn.Module().__dict__)


class SerializationError(StructpruneError):
    """A model cannot be written, or a file cannot be read back."""


# --- what a file may name ----------------------------------------------------------------------
class AllowList:
    """The modules and objects a file may name: ``"module:qualname"`` paths resolve only when
    the module is, or lies in, an allowed package (or the path itself was allowed) and is not
    denied. The object a path leads to is checked too, by its own ``__module__``: ``torch:os.
    system`` leads out of torch and is refused. Use the module's :data:`ALLOWED` and
    :func:`allow`."""

    def __init__(self, packages: tuple[str, ...], denied_packages: tuple[str, ...] = (),
                 denied: tuple[str, ...] = (), denied_names: tuple[str, ...] = ()) -> None:
        self.packages: set[str] = set(packages)
        self.objects: set[str] = set()
        self.denied_packages: set[str] = set(denied_packages)
        self.denied: set[str] = set(denied)  # "module:qualname" paths
        self.denied_names: set[str] = set(denied_names)  # a path's or object's last name

    @staticmethod
    def _within(module: str, packages: set[str]) -> bool:
        return any(module == p or module.startswith(p + ".") for p in packages)

    def allows_package(self, module: str) -> bool:
        """Whether ``module`` lies in an allowed package and in no denied one."""
        return self._within(module, self.packages) and \
            not self._within(module, self.denied_packages)

    def allows_module(self, module: str) -> bool:
        """Whether ``module`` may be imported when loading a file: it lies in an allowed
        package, or holds an object allowed by path."""
        return self.allows_package(module) or \
            any(o.partition(":")[0] == module for o in self.objects)

    def allows(self, path: str) -> bool:
        """Whether the object at ``path`` (``"module:qualname"``) may be named in a file."""
        if path in self.objects:
            return True
        module, _, name = path.partition(":")
        parts = name.split(".")
        return (self.allows_package(module) and path not in self.denied and
                parts[-1] not in self.denied_names and
                not any(p.startswith("__") for p in parts))

    def allow(self, what: Any) -> None:
        """Allow a package (``"mypkg"``, and its submodules), one object by path
        (``"mypkg.layers:Thing"``) or one class or function (``allow(Thing)``)."""
        if isinstance(what, str):
            if not what or " " in what or what.count(":") > 1:
                raise ValueError(f"allow() takes a package name ('mypkg') or an object path "
                                 f"('mypkg.layers:Thing'), not {what!r:.80}")
            (self.objects if ":" in what else self.packages).add(what)
            return
        module = getattr(what, "__module__", None)
        name = getattr(what, "__qualname__", None)
        if not (isinstance(module, str) and isinstance(name, str)) or "<locals>" in name:
            raise ValueError(f"allow() takes a module-level class or function (or a package "
                             f"name); {type(what).__name__} {what!r:.60} has no importable path")
        self.objects.add(f"{module}:{name}")

    def describe(self) -> str:
        return ", ".join(sorted(self.packages | self.objects))

    def __repr__(self) -> str:
        return f"AllowList({self.describe()})"


#: What files may name. Within these packages, what loads or runs code or data from a string or
#: a file, or reaches the file system, processes or the network, is denied (``exec``, ``open``,
#: ``torch.load``, ``torch.hub``, ``torch.ops.load_library``, ...).
ALLOWED = AllowList(
    packages=("torch", "operator", "_operator", "builtins", "math", "torch_geometric",
              "structprune"),
    denied_packages=("torch.hub", "torch.serialization", "torch.package",
                     "torch.jit._serialization", "torch.utils.cpp_extension",
                     "torch.utils.model_zoo", "torch.multiprocessing", "torch.distributed",
                     "torch_geometric.io", "torch_geometric.datasets", "structprune.io",
                     "structprune.cli"),
    denied=tuple(f"builtins:{n}" for n in (
        "eval", "exec", "compile", "__import__", "open", "input", "breakpoint", "globals",
        "locals", "vars", "setattr", "delattr", "exit", "quit", "help", "memoryview")) +
    tuple(f"{m}:{n}" for m in ("operator", "_operator")
          for n in ("call", "methodcaller", "attrgetter")),
    denied_names=("load", "save", "load_library", "import_ir_module",
                  "import_ir_module_from_buffer", "_load_for_lite_interpreter",
                  "_load_for_lite_interpreter_from_buffer", "system", "popen"))


def allow(*what: Any) -> None:
    """Let files name more than torch, PyG and structprune: a package (``allow("mypkg")``),
    one object by path (``allow("mypkg.layers:Thing")``) or a class or function itself
    (``allow(Thing)``). Only allow code you trust: loading a file imports what it names."""
    for w in what:
        ALLOWED.allow(w)


# --- values ------------------------------------------------------------------------------------
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def _describe(v: Any) -> str:
    """A short description of ``v`` for an error message: a tensor by type, shape and dtype,
    anything else by type and a repr cut to a few dozen characters."""
    if isinstance(v, torch.Tensor):
        dtype = str(v.dtype).replace("torch.", "")
        return f"{type(v).__name__} of shape {tuple(v.shape)} ({dtype})"
    if isinstance(v, (list, tuple, dict, set)) and any(
            isinstance(x, torch.Tensor) for x in (v.values() if isinstance(v, dict) else v)):
        return f"{type(v).__name__} of {len(v)} items holding tensors"
    try:
        text = _SHORT.repr(v)
    except Exception:  # a broken __repr__ must not hide the real error
        text = "?"
    return f"{type(v).__name__} ({text})"


def _enc(v: Any, where: str, refs: Optional[dict[int, str]] = None) -> Any:
    """JSON for ``v``; ``refs`` maps the model's own tensors (by ``id``) to their names, which
    are stored in their place."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return {"float": repr(v)} if (math.isinf(v) or math.isnan(v)) else v
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, torch.Tensor):
        if refs is not None and id(v) in refs:
            return {"tensor": refs[id(v)]}
        raise SerializationError(
            f"{where}: cannot store this {_describe(v)}: it is none of the model's parameters, "
            f"buffers or tensor attributes. Register it (module.register_buffer) to keep it.")
    if isinstance(v, tuple):
        return {"tuple": [_enc(x, f"{where}[{i}]", refs) for i, x in enumerate(v)]}
    if isinstance(v, list):
        return [_enc(x, f"{where}[{i}]", refs) for i, x in enumerate(v)]
    if isinstance(v, dict):
        return {"dict": [[_enc(k, where, refs), _enc(x, f"{where}[{k!r:.40}]", refs)]
                         for k, x in v.items()]}
    if isinstance(v, slice):
        return {"slice": [_enc(v.start, where), _enc(v.stop, where), _enc(v.step, where)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).replace("torch.", "")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).replace("torch.", "")}
    if isinstance(v, torch.layout):
        return {"layout": str(v).replace("torch.", "")}
    if isinstance(v, torch._ops.OpOverload):  # torch.ops.aten.conv2d.default
        return {"op": f"{v.namespace}.{v._schema.name.split('::', 1)[-1]}.{v._overloadname}"}
    if isinstance(v, torch._ops.OpOverloadPacket):  # torch.ops.aten.conv2d
        return {"op": v._qualified_op_name.replace("::", ".", 1)}
    if isinstance(v, torch._ops.HigherOrderOperator):  # torch.ops.higher_order.cond
        path = f"{v.namespace}.{v.name()}"
        if _resolve_op(path, check_only=True) is not v:
            raise SerializationError(f"{where}: the higher-order operator {v.name()} is not "
                                     f"registered as torch.ops.{path}, so it cannot be stored")
        return {"op": path}
    if callable(v):
        return {"fn": _qualname(v, where)}
    raise SerializationError(f"{where}: cannot store this {_describe(v)} (only plain Python "
                             f"values, torch dtypes and devices, torch functions and the model's "
                             f"own tensors can be)")


def _dec(v: Any, nodes: dict[str, fx.Node], root: Optional[nn.Module] = None) -> Any:
    """Inverse of :func:`_enc`; tensor references are looked up in ``root``."""
    if isinstance(v, list):
        return [_dec(x, nodes, root) for x in v]
    if not isinstance(v, dict):
        return v
    (tag, x), = v.items()
    if tag == "node":
        return nodes[x]
    if tag == "tensor":
        return _tensor_at(root, x)
    if tag == "tuple":
        return tuple(_dec(y, nodes, root) for y in x)
    if tag == "dict":
        return {_dec(k, nodes, root): _dec(y, nodes, root) for k, y in x}
    if tag == "slice":
        return slice(*(_dec(y, nodes) for y in x))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        return float(x)
    if tag in ("dtype", "memory_format", "layout"):
        kind = {"dtype": torch.dtype, "memory_format": torch.memory_format,
                "layout": torch.layout}[tag]
        value = getattr(torch, str(x), None)
        if not isinstance(value, kind):
            raise SerializationError(f"torch.{x!s:.60} in the file is not a torch.{tag}")
        return value
    if tag == "device":
        return torch.device(x)
    if tag == "fn":
        fn = _resolve(x)
        if isinstance(fn, type(math)):  # a module is a door to everything it imported
            raise SerializationError(f"{x:.120} in the file is a module, not a class or function")
        return fn
    if tag == "op":
        return _resolve_op(x)
    raise SerializationError(f"unknown tag {tag!r:.60} in the file")


def _qualname(obj: Any, where: str) -> str:
    mod = getattr(obj, "__module__", None) or ""
    names = [getattr(obj, "__name__", None), getattr(obj, "__qualname__", None)]
    mods = [mod, "torch", "torch.nn.functional", "builtins", "operator"]
    for m in mods:
        for name in names:
            if m and name and _resolve(f"{m}:{name}", check_only=True) is obj:
                return f"{m}:{name}"
    name = names[0] or names[1] or type(obj).__name__
    hint = (f"if you trust it, sp.io.allow('{mod.split('.')[0]}') before saving and loading"
            if mod and mod != "__main__" and "<locals>" not in name else
            "it must be a module-level class or function of an importable module")
    raise SerializationError(f"{where}: {mod + '.' if mod else ''}{name:.80} cannot be stored by "
                             f"name: files name only what the allow-list holds "
                             f"({ALLOWED.describe():.200}); {hint}")


def _resolve(path: str, check_only: bool = False) -> Any:
    """The object at ``path`` (``"module:qualname"``), if :data:`ALLOWED` lets files name it;
    a module outside the allow-list is never imported."""
    mod, _, name = path.partition(":")

    def refuse(why: str) -> Any:
        if check_only:
            return None
        top = mod.split(".")[0] or "?"
        raise SerializationError(
            f"refusing to import {path:.120}: {why}. Files may name only {ALLOWED.describe():.200}"
            f". If you trust this file and that code, allow it first: sp.io.allow('{top}') "
            f"(or sp.io.allow('{path:.120}') for this one object)")

    if not ALLOWED.allows(path):
        return refuse(f"{mod or '?'} is not on structprune's allow-list" if
                      not ALLOWED.allows_module(mod) else "that object is not allowed")
    try:
        obj: Any = importlib.import_module(mod)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        if check_only:
            return None
        raise SerializationError(f"cannot resolve {path:.120}: {exc}") from exc
    # The object must live where the allow-list says: 'torch:os.system' leads out of torch.
    home = obj.__name__ if isinstance(obj, type(importlib)) else getattr(obj, "__module__", None)
    if isinstance(home, str) and path not in ALLOWED.objects:
        own = f"{home}:{getattr(obj, '__qualname__', '')}"
        if not ALLOWED.allows_package(home) or own in ALLOWED.denied or \
                own.rpartition(".")[2].rpartition(":")[2] in ALLOWED.denied_names:
            return refuse(f"it leads to {home}.{getattr(obj, '__qualname__', '')}, which is "
                          f"not on structprune's allow-list")
    return obj


def _resolve_op(path: str, check_only: bool = False) -> Any:
    """``"aten.conv2d.default"`` -> ``torch.ops.aten.conv2d.default``, ``"higher_order.cond"``
    -> ``torch.ops.higher_order.cond`` (already registered operators: looking one up runs no
    code beyond importing torch's own higher-order operators)."""
    ns, _, rest = path.partition(".")
    name, _, overload = rest.partition(".")
    try:
        space = getattr(torch.ops, ns)
        if isinstance(space, torch._ops._HigherOrderNamespace):
            if overload:
                raise AttributeError(f"higher-order operators have no overloads ({overload})")
            if not hasattr(space, name):  # registered when torch's module defining it loads
                importlib.import_module("torch._higher_order_ops")
            op = getattr(space, name)
        elif isinstance(space, torch._ops._OpNamespace):
            packet = getattr(space, name)
            op = getattr(packet, overload) if overload else packet
        else:  # torch.ops.load_library & co.
            raise AttributeError(f"{ns} is not an operator namespace")
    except (AttributeError, RuntimeError, ImportError) as exc:
        if check_only:
            return None
        raise SerializationError(f"unknown operator torch.ops.{path:.120}: {exc}") from exc
    if not isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket,
                           torch._ops.HigherOrderOperator)):
        if check_only:
            return None
        raise SerializationError(f"torch.ops.{path:.120} is not an operator")
    return op


def _tensor_at(root: Optional[nn.Module], qual: str) -> torch.Tensor:
    """The tensor stored under ``qual`` (a parameter, buffer or tensor attribute of a module)."""
    parent, _, name = qual.rpartition(".")
    try:
        owner = root.get_submodule(parent) if parent else root  # type: ignore[union-attr]
        t = getattr(owner, name)
    except AttributeError as exc:
        raise SerializationError(f"the file refers to a tensor '{qual}' it does not hold") from exc
    if not isinstance(t, torch.Tensor):
        raise SerializationError(f"the file refers to '{qual}' as a tensor, but it is a "
                                 f"{type(t).__name__}")
    return t


# --- save --------------------------------------------------------------------------------------
def _as_graph_module(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """``model`` itself when it is a GraphModule, else its capture: by torch.fx, or by
    torch.export on ``example_inputs`` where fx cannot trace it."""
    if isinstance(model, fx.GraphModule):
        return model
    from .errors import TraceError
    from .graph.inputs import capture_guarded
    from .graph.capture import normalize_inputs
    from .graph.export_capture import adopt_tensors
    from .rules import registry

    inputs = normalize_inputs(example_inputs) if example_inputs is not None else None
    try:
        gm = capture_guarded(model, registry(), (), *(inputs or ((), {})),
                             with_inputs=inputs is not None)
    except TraceError as exc:
        if inputs is not None:
            raise
        said = " ".join(str(exc).split())
        said = said if len(said) <= 400 else said[:400] + " ..."
        raise SerializationError(
            f"{type(model).__name__} is not an fx.GraphModule and torch.fx cannot trace it; "
            f"pass the example inputs (sp.save(model, path, example_inputs=x)) so that it can "
            f"be captured with torch.export. torch.fx said: {said}") from exc
    adopt_tensors(gm, model)  # tensors the graph does not read stay in the state dict
    return gm


def _tensor_table(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, dict],
                                                dict[int, str]]:
    """The tensors to write, what each key is, and every tensor object's first key.

    A tensor held twice (tied weights, an attribute that is also a parameter) is written once;
    its other places say ``same_as`` the first.
    """
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, dict] = {}
    refs: dict[int, str] = {}
    storages: set[int] = set()

    def add(key: str, t: Optional[torch.Tensor], info: dict) -> None:
        if t is None:
            kinds[key] = info
            return
        if id(t) in refs:
            kinds[key] = {**info, "same_as": refs[id(t)]}
            return
        refs[id(t)] = key
        data = t.detach().cpu().contiguous()
        if data.untyped_storage().data_ptr() in storages:  # a view of another tensor
            data = data.clone()
        storages.add(data.untyped_storage().data_ptr())
        tensors[key] = data
        kinds[key] = info

    for p, m in gm.named_modules():
        for name, t in m._parameters.items():
            info = ({"kind": "none_param"} if t is None else
                    {"kind": "param", "grad": bool(t.requires_grad)})
            add(f"{p}.{name}" if p else name, t, info)
        for name, t in m._buffers.items():
            info = ({"kind": "none_buffer"} if t is None else
                    {"kind": "buffer", "persistent": name not in m._non_persistent_buffers_set})
            add(f"{p}.{name}" if p else name, t, info)
        for name, v in vars(m).items():  # plain tensor attributes (fx tensor constants)
            if isinstance(v, torch.Tensor):
                add(f"{p}.{name}" if p else name, v, {"kind": "attr"})
    return tensors, kinds, refs


def _graph_spec(gm: fx.GraphModule, where: str) -> list[dict]:
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise SerializationError(f"{where}: its graph has a custom code generator "
                                 f"({type(gm.graph._codegen).__name__}), which is not stored")
    nodes = []
    for n in gm.graph.nodes:
        at = f"{where} node {n.name}"
        target = _enc(n.target, at) if n.op == "call_function" else n.target
        nodes.append({"name": n.name, "op": n.op, "target": target,
                      "args": _enc(n.args, at), "kwargs": _enc(dict(n.kwargs), at)})
    return nodes


def _module_spec(path: str, m: nn.Module, refs: dict[int, str]) -> dict:
    cls = type(m)
    where = f"module '{path}' ({cls.__name__})"
    if isinstance(m, fx.GraphModule):  # a higher-order op's branch: its graph, recursively
        return {"class": "torch.nn.modules.module:Module", "attrs": {},
                "class_name": cls.__name__, "graph": _graph_spec(m, where)}
    state = m.__getstate__()  # as pickle sees it: without what the class rebuilds itself
    if not isinstance(state, dict):
        raise SerializationError(f"{where}: its __getstate__ returns a {type(state).__name__}, "
                                 f"not a dict of attributes")
    own = vars(m)
    attrs = {k: _enc(v, f"{where}.{k}", refs) for k, v in state.items()
             if k not in _BASE_KEYS and not (isinstance(v, torch.Tensor) and own.get(k) is v)}
    return {"class": _qualname(cls, where), "attrs": attrs}


def _input_sizes(gm: fx.GraphModule) -> dict[str, dict]:
    """For each placeholder holding a tensor of a ``torch.export`` capture (``meta["val"]``):
    its sizes, each an int or, where the capture left it open, the symbol's name (one name per
    symbol, so sizes export found equal stay equal), with the example sizes as ``hints``."""
    out: dict[str, dict] = {}
    for n in gm.graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if not isinstance(val, torch.Tensor):
            continue
        sizes: list[Any] = []
        hints: list[int] = []
        for s in val.shape:
            fixed = s.node.maybe_as_int() if isinstance(s, torch.SymInt) else int(s)
            sizes.append(fixed if fixed is not None else str(s.node.expr))
            hint = s.node.hint if isinstance(s, torch.SymInt) else None
            hints.append(int(hint) if hint is not None else (fixed if fixed is not None else 2))
        out[n.name] = {"sizes": sizes, "hints": hints,
                       "dtype": str(val.dtype).replace("torch.", ""), "device": str(val.device)}
    return out


def save(model: nn.Module, path: str, example_inputs: Any = None) -> None:
    """Write ``model`` (a pruned ``GraphModule`` or any capturable model) to ``path``.

    A model that is not a ``GraphModule`` (an unpruned model, or a pruned one of your own
    class) is captured first: by torch.fx, or, where fx cannot trace it, by torch.export on
    ``example_inputs`` (a tensor, a tuple of inputs or a dict of keyword inputs, as for
    :func:`structprune.prune`). The file then holds that graph, with the input sizes the
    capture left open. A ``GraphModule`` (what :func:`structprune.prune` returns for PyG models
    and every ``torch.export`` capture) is stored as it is, never re-traced.

    Raises:
        SerializationError: a submodule class or graph function lies outside the allow-list
            (:data:`ALLOWED`; :func:`allow` adds to it), or an attribute holds a value that
            cannot be stored, naming the module and the attribute; or fx cannot trace the model
            and no ``example_inputs`` were given.
    """
    from safetensors.torch import save_file

    from .partial import parts_of

    if parts_of(model) is not None:
        raise SerializationError(f"{type(model).__name__} was pruned in parts (it cannot be "
                                 f"captured whole), so it is no graph to store: use "
                                 f"torch.save(model, path) and torch.load(path, "
                                 f"weights_only=False)")
    gm = _as_graph_module(model, example_inputs)
    tensors, kinds, refs = _tensor_table(gm)
    modules: dict[str, dict] = {}
    first: dict[int, str] = {}
    for p, m in gm.named_modules(remove_duplicate=False):
        if not p:
            continue
        if id(m) in first:  # one module at two paths
            modules[p] = {"same_as": first[id(m)]}
        else:
            first[id(m)] = p
            modules[p] = _module_spec(p, m, refs)
    spec = {"format": FORMAT, "class_name": type(model).__name__, "modules": modules,
            "tensors": kinds, "graph": _graph_spec(gm, "the model's graph"),
            "training": model.training,
            "meta": {k: _enc(v, f"the model's meta[{k!r}]") for k, v in gm.meta.items()
                     if k.startswith("structprune_")},
            "inputs": _input_sizes(gm)}
    save_file(tensors, path, metadata={"structprune": json.dumps(spec)})


# --- load --------------------------------------------------------------------------------------
def _new_module(spec: dict, where: str) -> nn.Module:
    """An empty instance of the spec's class (attributes come later, see :func:`load`)."""
    cls = _resolve(spec["class"])
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SerializationError(f"{where}: {spec['class']:.120} is not an nn.Module class")
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    return m


def _check_names(node: str, op: str, target: Any, args: Any) -> None:
    """Refuse attribute names that lead from the model's values to what the allow-list keeps
    out (``x.__class__``, ``getattr(f, "__globals__")``, ``m.load(...)``)."""
    names: list[Any] = []
    if op in ("call_method", "get_attr", "call_module"):
        names = str(target).split(".")
    elif op == "call_function" and target in (getattr, hasattr) and len(args) > 1:
        names = [args[1]]
    bad = [n for n in names if not isinstance(n, str) or n.startswith("__") or
           n in ALLOWED.denied_names]
    if bad:
        raise SerializationError(f"refusing to load node {node:.60} ({op} {str(target):.80}): "
                                 f"the attribute name {bad[0]!r:.60} is not allowed in a file")


def _build_graph(nodes_spec: list[dict]) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for ns in nodes_spec:
        target = _dec(ns["target"], nodes)
        _check_names(ns["name"], ns["op"], target, _dec(ns["args"], nodes))
        nodes[ns["name"]] = graph.create_node(ns["op"], target, _dec(ns["args"], nodes),
                                              _dec(ns["kwargs"], nodes), name=ns["name"])
    return graph


def _graph_module(holder: nn.Module, nodes_spec: list[dict], name: str) -> fx.GraphModule:
    from .graph.export_capture import adopt_tensors

    gm = fx.GraphModule(holder, _build_graph(nodes_spec), name)
    adopt_tensors(gm, holder)  # tensors no node reads (e.g. an exported BatchNorm's counter)
    return gm


def _depth(path: str) -> int:
    return path.count(".")


def load(path: str, map_location: str = "cpu") -> fx.GraphModule:
    """Rebuild a model written by :func:`save`; needs no original code and unpickles nothing.

    The graph's ``structprune_*`` meta comes back, and a ``torch.export`` capture's placeholders
    get fake tensors with its open sizes as ``meta["val"]`` (what ``sp.export_onnx`` reads).

    Raises:
        SerializationError: the file names a class or function outside the allow-list
            (:data:`ALLOWED`; the message says how to :func:`allow` it; nothing outside it is
            imported), or an attribute name that leads past it; or it is no structprune file.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt", device=map_location) as f:
        meta = f.metadata() or {}
        if "structprune" not in meta:
            raise SerializationError(f"{path} is not a structprune file (no spec in its metadata)")
        spec = json.loads(meta["structprune"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if spec.get("format") != FORMAT:
        raise SerializationError(f"{path}: unsupported format {spec.get('format')!r:.60}")
    mods = spec["modules"]
    real = sorted((p for p in mods if "same_as" not in mods[p]), key=_depth)
    root = nn.Module()
    for p in real:  # 1. the module tree, parents first
        parent, _, name = p.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        owner.add_module(name, _new_module(mods[p], f"module '{p}'"))
    for key, info in spec["tensors"].items():  # 2. its tensors
        parent, _, name = key.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        kind = info["kind"]
        t = _tensor_at(root, info["same_as"]) if "same_as" in info else tensors.get(key)
        if kind == "none_param":
            owner.register_parameter(name, None)
        elif kind == "none_buffer":
            owner.register_buffer(name, None)
        elif kind == "param":
            if not isinstance(t, nn.Parameter):
                t = nn.Parameter(t, requires_grad=info["grad"])
            owner.register_parameter(name, t)
        elif kind == "buffer":
            owner.register_buffer(name, t, persistent=info["persistent"])
        else:
            object.__setattr__(owner, name, t)
    for p in real:  # 3. attributes, through the class's own __setstate__ (derived state)
        m = root.get_submodule(p)
        state = dict(m.__dict__)
        state.update({k: _dec(v, {}, root) for k, v in mods[p]["attrs"].items()})
        m.__setstate__(state)
    for p in sorted((p for p in mods if "same_as" in mods[p]), key=_depth):  # 4. shared ones
        parent, _, name = p.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        if name not in owner._modules:  # else it lies inside a shared module, already there
            owner.add_module(name, root.get_submodule(mods[p]["same_as"]))
    for p in sorted((p for p in real if "graph" in mods[p]), key=_depth, reverse=True):
        holder = root.get_submodule(p)  # 5. nested graphs (higher-order ops), innermost first
        sub = _graph_module(holder, mods[p]["graph"], mods[p].get("class_name", "GraphModule"))
        for m in root.modules():
            for k, child in list(m._modules.items()):
                if child is holder:
                    m._modules[k] = sub
    gm = _graph_module(root, spec["graph"], spec["class_name"])
    gm.train(spec.get("training", False))
    gm.meta.update({k: _dec(v, {}) for k, v in spec.get("meta", {}).items()})
    _restore_input_sizes(gm, spec.get("inputs", {}))
    return gm


def _restore_input_sizes(gm: fx.GraphModule, inputs: dict[str, dict]) -> None:
    """Give the placeholders back their ``meta["val"]``: fake tensors whose open sizes are
    symbols of one fresh ``ShapeEnv`` (one per name stored by :func:`_input_sizes`), as the
    ``torch.export`` capture left them, so that what reads them (``sp.export_onnx``'s open
    axes) sees the loaded model as it saw the saved one."""
    if not inputs:
        return
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv(duck_shape=False)  # sizes stay distinct unless the file says they are one
    symbols: dict[str, torch.SymInt] = {}

    def size(key: Any, hint: int, where: str) -> Any:
        if isinstance(key, int):
            return key
        if key not in symbols:
            source = ConstantSource(where)
            sym = env.create_symbol(max(int(hint), 2), source, dynamic_dim=DimDynamic.DYNAMIC)
            symbols[key] = env.create_symintnode(sym, hint=max(int(hint), 2), source=source)
        return symbols[key]

    mode = FakeTensorMode(shape_env=env)
    for n in gm.graph.nodes:
        info = inputs.get(n.name) if n.op == "placeholder" else None
        if info is None:
            continue
        sizes = [size(k, h, f"{n.name}_size_{d}")
                 for d, (k, h) in enumerate(zip(info["sizes"], info["hints"]))]
        with mode:
            n.meta["val"] = torch.empty(sizes, dtype=getattr(torch, info["dtype"]),
                                        device=info["device"])
