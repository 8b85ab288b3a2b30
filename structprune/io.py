"""Save and load a (pruned) model without its original code and without pickle.

The file is one safetensors file: the tensors (parameters, buffers, tensor constants) plus, in its
metadata, a JSON spec of the module tree (class path and plain attributes of every submodule)
and of the fx graph (op, target, args of every node). Loading rebuilds the modules and the
``fx.GraphModule``. Only functions and classes from ``torch``, ``operator``, ``math`` and
``builtins`` are resolved, plus registered operators (``torch.ops.aten.conv2d.default``, in graphs
captured by ``torch.export``), so loading a file never runs code that is not already installed.
"""
from __future__ import annotations

import importlib
import json
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import StructpruneError

FORMAT = "structprune/1"
_SAFE_PREFIXES = ("torch", "_operator", "operator", "builtins", "math")
_BASE_KEYS = set(nn.Module().__dict__)


class SerializationError(StructpruneError):
    """A model cannot be written, or a file cannot be read back."""


# --- values ------------------------------------------------------------------------------------
def _enc(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return {"float": repr(v)} if (math.isinf(v) or math.isnan(v)) else v
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, tuple):
        return {"tuple": [_enc(x, where) for x in v]}
    if isinstance(v, list):
        return [_enc(x, where) for x in v]
    if isinstance(v, dict):
        return {"dict": [[_enc(k, where), _enc(x, where)] for k, x in v.items()]}
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
    if callable(v):
        return {"fn": _qualname(v, where)}
    raise SerializationError(f"{where}: cannot store a {type(v).__name__} ({v!r})")


def _dec(v: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(v, list):
        return [_dec(x, nodes) for x in v]
    if not isinstance(v, dict):
        return v
    (tag, x), = v.items()
    if tag == "node":
        return nodes[x]
    if tag == "tuple":
        return tuple(_dec(y, nodes) for y in x)
    if tag == "dict":
        return {_dec(k, nodes): _dec(y, nodes) for k, y in x}
    if tag == "slice":
        return slice(*(_dec(y, nodes) for y in x))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        return float(x)
    if tag in ("dtype", "memory_format", "layout"):
        return getattr(torch, x)
    if tag == "device":
        return torch.device(x)
    if tag == "fn":
        return _resolve(x)
    if tag == "op":
        return _resolve_op(x)
    raise SerializationError(f"unknown tag {tag!r} in the file")


def _qualname(obj: Any, where: str) -> str:
    mod = getattr(obj, "__module__", None) or ""
    names = [getattr(obj, "__name__", None), getattr(obj, "__qualname__", None)]
    mods = [mod, "torch", "torch.nn.functional", "builtins", "operator"]
    for m in mods:
        for name in names:
            if m and name and _resolve(f"{m}:{name}", check_only=True) is obj:
                return f"{m}:{name}"
    raise SerializationError(f"{where}: {mod}.{names[0]} cannot be stored by name (only torch, "
                             f"operator, math and builtins objects are)")


def _resolve(path: str, check_only: bool = False) -> Any:
    mod, _, name = path.partition(":")
    if not mod.split(".")[0] in _SAFE_PREFIXES:
        if check_only:
            return None
        raise SerializationError(f"refusing to import {path}: only torch, operator, math and "
                                 f"builtins are resolved when loading")
    try:
        obj: Any = importlib.import_module(mod)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        if check_only:
            return None
        raise SerializationError(f"cannot resolve {path}: {exc}") from exc
    return obj


def _resolve_op(path: str) -> Any:
    """``"aten.conv2d.default"`` -> ``torch.ops.aten.conv2d.default`` (an already registered
    operator: looking it up runs no code)."""
    ns, _, rest = path.partition(".")
    name, _, overload = rest.partition(".")
    try:
        space = getattr(torch.ops, ns)
        if not isinstance(space, torch._ops._OpNamespace):  # torch.ops.load_library & co.
            raise AttributeError(f"{ns} is not an operator namespace")
        packet = getattr(space, name)
        op = getattr(packet, overload) if overload else packet
    except (AttributeError, RuntimeError) as exc:
        raise SerializationError(f"unknown operator torch.ops.{path}: {exc}") from exc
    if not isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        raise SerializationError(f"torch.ops.{path} is not an operator")
    return op


# --- save --------------------------------------------------------------------------------------
def _as_graph_module(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    from .graph.trace import capture
    from .ops.registry import registry

    return capture(model, registry())


def _module_spec(path: str, m: nn.Module) -> dict:
    cls = type(m)
    if isinstance(m, fx.GraphModule):
        return {"class": "torch.nn.modules.module:Module", "attrs": {}}
    where = f"module '{path}' ({cls.__name__})"
    attrs = {k: _enc(v, f"{where}.{k}") for k, v in vars(m).items()
             if k not in _BASE_KEYS and not isinstance(v, (torch.Tensor, nn.Module))}
    return {"class": _qualname(cls, where), "attrs": attrs}


def save(model: nn.Module, path: str) -> None:
    """Write ``model`` (a pruned ``GraphModule`` or any traceable model) to ``path``.

    Raises:
        SerializationError: a submodule class or graph function lives outside torch/operator/
            math/builtins (it could not be rebuilt without its code), naming it.
    """
    from safetensors.torch import save_file

    gm = _as_graph_module(model)
    modules = {p: _module_spec(p, m) for p, m in gm.named_modules() if p}
    tensors, kinds = {}, {}
    for p, m in gm.named_modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            key = f"{p}.{name}" if p else name
            if t is None:
                kinds[key] = {"kind": "none_param" if name in m._parameters else "none_buffer"}
                continue
            tensors[key] = t.detach().contiguous().cpu()
            kinds[key] = {"kind": "param" if name in m._parameters else "buffer",
                          "grad": bool(t.requires_grad),
                          "persistent": name not in m._non_persistent_buffers_set}
        for name, v in vars(m).items():  # plain tensor attributes (fx tensor constants)
            if isinstance(v, torch.Tensor) and name not in ("_parameters", "_buffers"):
                key = f"{p}.{name}" if p else name
                tensors[key] = v.detach().contiguous().cpu()
                kinds[key] = {"kind": "attr"}
    nodes = []
    for n in gm.graph.nodes:
        where = f"node {n.name}"
        target = _enc(n.target, where) if n.op == "call_function" else n.target
        nodes.append({"name": n.name, "op": n.op, "target": target,
                      "args": _enc(n.args, where), "kwargs": _enc(dict(n.kwargs), where)})
    spec = {"format": FORMAT, "class_name": type(model).__name__, "modules": modules,
            "tensors": kinds, "graph": nodes, "training": model.training}
    save_file(tensors, path, metadata={"structprune": json.dumps(spec)})


# --- load --------------------------------------------------------------------------------------
def _build_module(spec: dict, where: str) -> nn.Module:
    cls = _resolve(spec["class"])
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SerializationError(f"{where}: {spec['class']} is not an nn.Module class")
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in spec["attrs"].items():
        object.__setattr__(m, k, _dec(v, {}))
    return m


def load(path: str, map_location: str = "cpu") -> fx.GraphModule:
    """Rebuild a model written by :func:`save`; needs no original code and unpickles nothing."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device=map_location) as f:
        meta = f.metadata() or {}
        if "structprune" not in meta:
            raise SerializationError(f"{path} is not a structprune file (no spec in its metadata)")
        spec = json.loads(meta["structprune"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if spec.get("format") != FORMAT:
        raise SerializationError(f"{path}: unsupported format {spec.get('format')!r}")
    root = nn.Module()
    for p in sorted(spec["modules"], key=lambda s: s.count(".")):
        parent, _, name = p.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        owner.add_module(name, _build_module(spec["modules"][p], f"module '{p}'"))
    for key, info in spec["tensors"].items():
        parent, _, name = key.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        t = tensors.get(key)
        if info["kind"] == "none_param":
            owner.register_parameter(name, None)
        elif info["kind"] == "none_buffer":
            owner.register_buffer(name, None)
        elif info["kind"] == "param":
            owner.register_parameter(name, nn.Parameter(t, requires_grad=info["grad"]))
        elif info["kind"] == "buffer":
            owner.register_buffer(name, t, persistent=info["persistent"])
        else:
            object.__setattr__(owner, name, t)
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for ns in spec["graph"]:
        target = _dec(ns["target"], nodes)
        n = graph.create_node(ns["op"], target, _dec(ns["args"], nodes),
                              _dec(ns["kwargs"], nodes), name=ns["name"])
        nodes[ns["name"]] = n
    gm = fx.GraphModule(root, graph, spec["class_name"])
    from .graph.trace import adopt_tensors

    adopt_tensors(gm, root)  # tensors no node reads (e.g. an exported BatchNorm's counter)
    gm.train(spec.get("training", False))
    return gm
