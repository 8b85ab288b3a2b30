"""The rule contract: spaces, the records op rules emit, :class:`OpRule`, its three contexts and
the registry. It sits below both ``graph/`` (which traces, couples and solves) and ``ops/`` (the
rules): each imports it, neither imports the other.

A *space* (:class:`Space`) is one dimension of one tensor the trace sees, typed by its kind: an fx
node's output (``Space.activation("conv1", 1)``), a model input (``Space.model_input("x", 0)``),
one item of a node's tuple output (``Space.item("split", 0, 1)``; a nested item by its path,
``Space.item("lstm", (1, 0), 2)`` for ``lstm(x)[1][0]``) or a parameter/buffer
(``Space.param("layer1.0.conv1.weight", 0)``), at a :class:`Level` (channels; graph nodes or
edges). Rules say which indices of which spaces are the same unit (:class:`Couple`), which may
never be removed (:class:`Freeze`), what a parameter dim is to its op (:class:`Role`) and, where
an op can be coupled in several valid ways, the alternatives (:class:`Choice`).

A rule (one :class:`OpRule` per op, keyed on the real target) owns everything the library needs
to know about an op::

    couple(ctx: CoupleContext)    which indices of its inputs, outputs and parameters are one unit
    update(actx: ApplyContext)    after slicing: fix module attributes and literal arguments
    macs(mctx: MacContext)        multiply-accumulates of one call at the (pruned) shapes
    head_dims(node, shapes)       which operand dims are attention heads
    decomposes / trace_through    how the tracer treats a module keyed on the rule: a leaf, or
                                  traced through functional ops (``nn.MultiheadAttention``)

Keys are module classes (``nn.Conv2d``), functions (``torch.cat``, ``operator.add``) or method
names (``"view"``). Anything without a rule is frozen: its tensors couple to the sentinel.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

#: An item of a container-valued node: a key (tuple/list position or dict key) or a path of them.
ItemIndex = Union[int, str, tuple]


class SpaceKind(IntEnum):
    """Which tensor a :class:`Space` is a dim of.

    An ``IntEnum`` so that spaces hash and compare as plain tuples (at C speed).
    """

    ACTIVATION = 0  #: the one tensor an fx node outputs
    PARAMETER = 1  #: a parameter, buffer or tensor attribute, by qualified name
    TUPLE_ITEM = 2  #: a tensor inside a node's tuple/list/dict output, at any depth
    MODEL_INPUT = 3  #: a placeholder: a tensor the model is called with


class Level(IntEnum):
    """What the indices of a space's dim are: channels (today everything), or the node/edge dim
    of a graph's tensors (GNNs). Part of a space's identity."""

    CHANNEL = 0
    GRAPH_NODE = 1
    GRAPH_EDGE = 2


class Space(NamedTuple):
    """One dimension of one tensor, typed: ``kind`` says which tensor ``name`` names.

    Build spaces with the named constructors (:meth:`activation`, :meth:`model_input`,
    :meth:`of_node`, :meth:`item`, :meth:`param`) and read them with the accessors
    (:attr:`node`, :attr:`param_name`, :attr:`is_param`, ...), never from a string. ``name`` is
    an fx node name (activations, model inputs, tuple items) or a parameter/buffer's qualified
    name (parameters); ``item_index`` is the item of a container-valued node (else None): its
    key in the node's output (a position, or a dict key), and ``item_subpath`` the keys below
    it for a tensor nested deeper (``out[1][0]``: ``1`` and ``(0,)``; :attr:`item_path` reads
    them as one path, ``(1, 0)``); ``level`` takes part in equality, so one dim at two levels
    is two spaces. (Spaces of one node and dim sort by their paths: the keys at one depth of
    one container are all positions or all dict keys, so they compare.)

    A named tuple of ints and strings (the enums are ``IntEnum``): spaces are hashed and compared
    millions of times while coupling and grouping, and tuple hashing runs in C.
    """

    name: str
    dim: int
    kind: SpaceKind = SpaceKind.ACTIVATION
    item_index: Optional[Union[int, str]] = None
    level: Level = Level.CHANNEL
    item_subpath: tuple = ()

    # --- constructors ----------------------------------------------------------------------------
    @staticmethod
    def activation(node: str, dim: int, level: Level = Level.CHANNEL) -> "Space":
        """Dim ``dim`` of the tensor fx node ``node`` outputs."""
        return _new(Space, (node, dim, _ACTIVATION, None, level, ()))

    @staticmethod
    def model_input(node: str, dim: int, level: Level = Level.CHANNEL) -> "Space":
        """Dim ``dim`` of the model input that placeholder ``node`` stands for."""
        return _new(Space, (node, dim, _MODEL_INPUT, None, level, ()))

    @staticmethod
    def of_node(node: "fx.Node", dim: int, level: Level = Level.CHANNEL) -> "Space":
        """Dim ``dim`` of fx node ``node``'s tensor: a model input for a placeholder, else an
        activation."""
        kind = _MODEL_INPUT if node.op == "placeholder" else _ACTIVATION
        return _new(Space, (node.name, dim, kind, None, level, ()))

    @staticmethod
    def item(node: str, k: ItemIndex, dim: int, level: Level = Level.CHANNEL) -> "Space":
        """Dim ``dim`` of item ``k`` of the tuple/list/dict fx node ``node`` outputs; ``k`` is a
        key, or a path of keys into nested containers (``(1, 0)``: ``out[1][0]``)."""
        if type(k) is tuple:
            return _new(Space, (node, dim, _TUPLE_ITEM, k[0], level, k[1:]))
        return _new(Space, (node, dim, _TUPLE_ITEM, k, level, ()))

    @staticmethod
    def param(qualname: str, dim: int, level: Level = Level.CHANNEL) -> "Space":
        """Dim ``dim`` of the parameter, buffer or tensor attribute ``qualname``
        (``"layer1.0.conv1.weight"``)."""
        return _new(Space, (qualname, dim, _PARAMETER, None, level, ()))

    def with_dim(self, dim: int) -> "Space":
        """Another dim of the same tensor, at the same level."""
        return _new(Space, (self.name, dim, self.kind, self.item_index, self.level,
                            self.item_subpath))

    # --- accessors -------------------------------------------------------------------------------
    @property
    def is_param(self) -> bool:
        """A parameter, buffer or tensor attribute (not a node's output)."""
        return self.kind == _PARAMETER

    @property
    def is_item(self) -> bool:
        """One item of a tuple-valued node."""
        return self.kind == _TUPLE_ITEM

    @property
    def item_path(self) -> tuple:
        """The keys from the node's output down to this item (``(1, 0)`` for ``out[1][0]``);
        ``()`` for a space that is not an item."""
        return () if self.item_index is None else (self.item_index,) + self.item_subpath

    @property
    def is_input(self) -> bool:
        """A model input (a placeholder's tensor)."""
        return self.kind == _MODEL_INPUT

    @property
    def is_node_tensor(self) -> bool:
        """The whole tensor output of an fx node (an activation or a model input), the spaces
        the masked-activation oracle masks."""
        return self.kind == _ACTIVATION or self.kind == _MODEL_INPUT

    @property
    def node(self) -> Optional[str]:
        """The fx node whose output this is (for a tuple item: the tuple's node); None for a
        parameter."""
        return None if self.kind == _PARAMETER else self.name

    @property
    def param_name(self) -> Optional[str]:
        """The qualified name of a parameter space (``"layer1.0.conv1.weight"``), else None."""
        return self.name if self.kind == _PARAMETER else None

    @property
    def module_path(self) -> Optional[str]:
        """The module owning a parameter space (``"layer1.0.conv1"``, ``""`` for the root),
        else None."""
        return self.name.rpartition(".")[0] if self.kind == _PARAMETER else None

    @property
    def attr_name(self) -> Optional[str]:
        """A parameter space's attribute name on its module (``"weight"``), else None."""
        return self.name.rpartition(".")[2] if self.kind == _PARAMETER else None

    def __repr__(self) -> str:
        if self.kind == _PARAMETER:
            base = "@" + self.name
        elif self.kind == _TUPLE_ITEM:
            base = self.name + "".join(f"#{k}" for k in self.item_path)
        else:
            base = self.name
        lvl = "" if self.level == Level.CHANNEL else f" ({self.level.name.lower()})"
        return f"{base}[{self.dim}]{lvl}"

    __str__ = __repr__


_new = tuple.__new__
_ACTIVATION, _PARAMETER = SpaceKind.ACTIVATION, SpaceKind.PARAMETER
_TUPLE_ITEM, _MODEL_INPUT = SpaceKind.TUPLE_ITEM, SpaceKind.MODEL_INPUT


IndexLike = Union[np.ndarray, Sequence[int], None]


@dataclass(frozen=True)
class Couple:
    """``a`` index ``a_idx[k]`` is the same unit as ``b`` index ``b_idx[k]`` (``None`` = all)."""

    a: Space
    b: Space
    a_idx: IndexLike = None
    b_idx: IndexLike = None

    @staticmethod
    def block(a: Space, b: Space, n: int, size: int) -> "Couple":
        """``a`` index i is the same unit as ``b`` indices ``i*size .. (i+1)*size-1``."""
        return Couple(a, b, np.repeat(np.arange(n), size), np.arange(n * size))


@dataclass(frozen=True)
class Freeze:
    """The indices ``idx`` (``None`` = all) of ``space`` may never be removed, because ``reason``."""

    space: Space
    reason: str
    idx: IndexLike = None


@dataclass(frozen=True)
class Address(Freeze):
    """A :class:`Freeze` of rows picked by index *values*: the rows of ``space`` (along its dim)
    are what the values of node ``index`` name (a gather's source, a scatter's target, the
    positions ``arange`` counts). Channels: removing a row would shift every row after it, so it
    is frozen. Graph units (:mod:`structprune.graph.units`): a one-way relation instead, the
    rows are nodes the index refers to, and dropping one drops every index entry naming it."""

    index: Optional[str] = None


@dataclass(frozen=True)
class SizeValue(Freeze):
    """A :class:`Freeze` of a dim whose size node ``consumer`` uses as a value (``h.sum(-1) /
    h.size(-1)``, a guard ``torch._assert(x.size(0) >= 2)``). Graph units drop it where the
    consumer only checks the size (a guard raises on a graph it does not accept)."""

    consumer: str = ""


@dataclass(frozen=True)
class Role:
    """Say what a parameter dim is to its op (``out``, ``in``, ``norm``, ``bias``), for scorers."""

    space: Space
    role: str


@dataclass
class Choice:
    """Alternative couplings of one op; the solver takes the first whose ``key`` space is not frozen.

    A reshape that splits one dim into several (``3E -> (3, H, D)``) can tie the flat dim to any
    one of the factors, and the others must then stay whole. Which factor is free is only known
    once the rest of the graph is coupled, so the solver tries them in order.
    """

    options: list[tuple[Space, list]]
    chosen: int = 0


Record = Union[Couple, Freeze, Role, Choice]  # Address and SizeValue are Freezes


RuleKey = Union[type, Callable[..., Any], str]  # a module class, a callable, or a method name


class OpRule:
    """Base class of op rules. Rules are stateless, so one instance serves every graph.

    Call tree during :func:`structprune.trace`::

        couple(ctx)  -> records (Couple / Freeze / Role / Choice)
        (dims of the node's tensors that no record mentions are frozen afterwards)

    and during apply::

        update(actx) -> edits module attributes or ``actx.node.args`` in place

    A rule keyed on a module class also says how the tracer treats that module: a leaf by
    default (one ``call_module`` node the rule couples), or, with ``decomposes = True``, traced
    through :meth:`trace_through`, a functional equivalent whose ops the graph sees.
    """

    #: If False, input dims the rule does not mention stay free (shape queries like ``x.size()``).
    freezes_unmentioned: bool = True
    #: False for opt-in rules whose pruning is approximate (the pruned model deviates from the
    #: masked original); the pruner then measures and reports the deviation.
    exact: bool = True
    #: True if the tracer should trace a module keyed on this rule through :meth:`trace_through`
    #: instead of keeping it a leaf (the rule's :meth:`couple` then sees only the calls that
    #: :meth:`trace_through` declines, and the calls of modules the user made leaves).
    decomposes: bool = False
    #: True if a module keyed on this rule returns a tensor of its one input's shape, dtype and
    #: layout (activations, dropout): shape records then take that shape without running it.
    preserves_shape: bool = False

    def couple(self, ctx: "CoupleContext") -> Iterable[Record]:
        """The coupling records of one call (default: none, so everything it touches freezes)."""
        return ()

    def trace_through(self, module: nn.Module, getp: Callable[[str], Any], *args: Any,
                      **kwargs: Any) -> Any:
        """Trace one call of ``module`` (a ``decomposes`` rule's module) with traceable functional
        ops on the tracer's proxies ``args``/``kwargs``; ``getp(name)`` is the graph value of the
        module's parameter ``name``. Return ``NotImplemented`` to keep this call a leaf."""
        return NotImplemented

    def update(self, actx: "ApplyContext") -> None:
        """Adjust module attributes or literal node arguments to the new shapes (default: none)."""

    def head_dims(self, node: fx.Node, shapes: dict[str, tuple[int, ...]]) -> list[Space]:
        """The spaces of this call's operands that are attention heads (what ``head_ratio``
        prunes apart); default: none."""
        return []

    def macs(self, mctx: "MacContext") -> int:
        """Multiply-accumulates of one call given the shapes in ``mctx`` (default: 0)."""
        return 0

    def graph_couple(self, ctx: "CoupleContext") -> Iterable[Record]:
        """Records that hold where graph nodes and edges are units (:mod:`structprune.graph.units`)
        besides :meth:`couple`'s: how an index tensor's entries map to the rows it produces
        (``x[idx]``: result row k is index entry k). Channel pruning never reads them. The
        example's tensor values are ``ctx.value(node)`` (a bool mask's positions). Default: none."""
        return ()


class Frozen(OpRule):
    """Placeholder for ops without a rule: everything they touch is frozen."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_REGISTRY: dict[RuleKey, OpRule] = {}


def register(*keys: RuleKey) -> Callable[[type], type]:
    """Class decorator: instantiate the rule once and register it under every key."""

    def deco(cls: type) -> type:
        rule = cls()
        for k in keys:
            _REGISTRY[k] = rule
        return cls

    return deco


def extend(cls: type, *keys: RuleKey) -> None:
    """Register more keys for an existing rule class (e.g. the ATen overloads of an op whose
    arguments follow the same convention), sharing its registered instance."""
    rule = next((r for r in _REGISTRY.values() if type(r) is cls), None) or cls()
    for k in keys:
        _REGISTRY[k] = rule


def aten_ops(*names: str) -> list[Any]:
    """The ATen overloads ``"relu.default"``, ``"scatter_add_.default"``, ... that exist in
    this torch build (registry keys for the ops of ``torch.export`` graphs)."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None:
            out.append(op)
    return out


def node_arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Positional argument ``i`` or keyword ``name`` of an fx node's call."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def op_name(target: Any) -> str:
    """The bare name of an op: ``"view"`` for the method ``"view"``, ``torch.Tensor.view``'s
    functional twins and ``torch.ops.aten.view.default``; ``__name__`` for other callables."""
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target._qualified_op_name.split("::", 1)[-1] if isinstance(
            target, torch._ops.OpOverloadPacket) else target._schema.name.split("::", 1)[-1]
    return getattr(target, "__name__", repr(target))


def registry() -> dict[RuleKey, OpRule]:
    """A copy of the built-in registry (module classes, functions and method names)."""
    return dict(_REGISTRY)


def registered(key: RuleKey) -> Optional[OpRule]:
    """The built-in rule registered for ``key`` exactly (no base-class lookup, no copy of the
    registry), or None."""
    try:
        return _REGISTRY.get(key)
    except TypeError:  # an unhashable key
        return None


def module_rule(module: nn.Module, rules: dict[RuleKey, OpRule]) -> Optional[OpRule]:
    """The rule of a module (by its class, or a base class it computes like), or None."""
    cls = type(module)
    if cls in rules:
        return rules[cls]
    for base in cls.__mro__[1:]:
        if base in rules and issubclass(base, nn.Module):
            # A subclass inherits its base's rule only if it computes the same thing: it
            # overrides none of the base's methods (a Conv2d subclass may change the weight
            # in ``_conv_forward`` and keep ``forward``), its construction and repr aside.
            return rules[base] if _same_computation(cls, base) else None
    return None


_NOT_COMPUTATION = {"__init__", "extra_repr", "reset_parameters", "__repr__", "__setstate__",
                    "_check_input_dim", "_load_from_state_dict", "_get_name", "__init_subclass__"}


def _same_computation(cls: type, base: type) -> bool:
    """Whether subclass ``cls`` leaves every method of ``base`` (and of its ancestors below
    ``nn.Module``) as it is, apart from construction and representation."""
    for c in base.__mro__:
        if c is nn.Module or not issubclass(c, nn.Module):
            break
        for k, v in vars(c).items():
            if k in _NOT_COMPUTATION or not (callable(v) or isinstance(
                    v, (staticmethod, classmethod, property))):
                continue
            if getattr(cls, k, None) is not getattr(base, k, None):
                return False
    return True


def describe(node: fx.Node) -> str:
    """A short human name of a node's op: ``nn.Conv2d``, ``torch.cat``, ``.view``."""
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return f"{t.namespace}.{t.__name__}"  # aten.conv2d.default
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", repr(t))
        if mod in ("_operator", "operator"):
            mod = "operator"
        return f"{mod}.{name}" if mod else name
    return node.op


def lookup(node: fx.Node, module: Optional[nn.Module], rules: dict[RuleKey, OpRule]) -> OpRule:
    """The rule for ``node``, or a :class:`Frozen` rule saying why there is none."""
    if node.op == "call_module":
        assert module is not None
        rule = module_rule(module, rules)
        if rule is None:
            return Frozen(f"no rule for {type(module).__module__}.{type(module).__qualname__} "
                          f"(module '{node.target}')")
        return rule
    if node.op == "call_function":
        try:
            rule = rules.get(node.target)
        except TypeError:  # unhashable target
            rule = None
        if rule is None:  # functions of optional packages are keyed by "module.name"
            t = node.target
            rule = rules.get(f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', '')}")
        return rule if rule is not None else Frozen(f"no rule for {describe(node)}")
    if node.op == "call_method":
        rule = rules.get(str(node.target))
        return rule if rule is not None else Frozen(f"no rule for {describe(node)}")
    return Frozen(f"no rule for {node.op}")


#: What ``graph/shapes.py`` records per node: ``torch.Size`` for a tensor; for a tuple/list or
#: dict that holds tensors at any depth, a list or dict of its items' records (``(out, (ei,
#: alpha))`` -> ``[Size, [Size, Size]]``); None for anything else.
ShapeRecord = Any


def record_at(record: ShapeRecord, path: Sequence[Any]) -> ShapeRecord:
    """The record of the item ``path`` leads to (``record[1][0]`` for ``(1, 0)``), or None."""
    for k in path:
        if isinstance(record, list) and type(k) is int and -len(record) <= k < len(record):
            record = record[k]
        elif isinstance(record, dict) and not isinstance(k, (list, dict)) and k in record:
            record = record[k]
        else:
            return None
    return record


def record_leaves(record: ShapeRecord, prefix: tuple = ()) -> Iterator[tuple[tuple, torch.Size]]:
    """``(path, shape)`` of every tensor in ``record``, depth first (``()`` for a tensor)."""
    if isinstance(record, torch.Size):
        yield prefix, record
    elif isinstance(record, list):
        for k, r in enumerate(record):
            yield from record_leaves(r, prefix + (k,))
    elif isinstance(record, dict):
        for k, r in record.items():
            yield from record_leaves(r, prefix + (k,))


def map_record(record: ShapeRecord, fn: Callable[[tuple, torch.Size], Any],
               prefix: tuple = ()) -> Any:
    """``record`` with every tensor's shape replaced by ``fn(path, shape)``, containers kept."""
    if isinstance(record, torch.Size):
        return fn(prefix, record)
    if isinstance(record, list):
        return [map_record(r, fn, prefix + (k,)) for k, r in enumerate(record)]
    if isinstance(record, dict):
        return {k: map_record(r, fn, prefix + (k,)) for k, r in record.items()}
    return None


def tensor_shapes(shapes: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{node name: shape tuple}`` for the nodes whose value is one tensor."""
    return {k: tuple(v) for k, v in shapes.items() if isinstance(v, torch.Size)}


class CoupleContext:
    """What a rule sees while coupling one node: its arguments, shapes and spaces."""

    def __init__(self, node: fx.Node, module: Optional[nn.Module], shapes: dict[str, Any],
                 values: dict[str, Any], module_path: Optional[str] = None,
                 tuple_shapes: Optional[dict[str, tuple[int, ...]]] = None) -> None:
        self.node = node
        self.module = module
        self._shapes = shapes
        self._values = values
        self.module_path = module_path
        # Tensor shapes as tuples, shared by all contexts of one graph (rules ask for them often).
        self._tuples = tuple_shapes if tuple_shapes is not None else tensor_shapes(shapes)
        #: Where a split dim may be tied to one of several factors (``E -> (H, D)``), prefer the
        #: innermost (per-head channels) over the outermost (whole heads): ``head_channels``.
        self.inner_first = False

    # --- arguments -----------------------------------------------------------------------------
    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``name`` of the call (module calls: its inputs)."""
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def value(self, a: Any) -> Any:
        """The concrete value of an argument during the example run (ints, tuples, tensors)."""
        if isinstance(a, fx.Node):
            return self._values.get(a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        return a

    # --- shapes and spaces ---------------------------------------------------------------------
    def shape(self, a: Any) -> Optional[tuple[int, ...]]:
        """The output shape of tensor node ``a``, or None if ``a`` is not a tensor node."""
        if isinstance(a, fx.Node):
            return self._tuples.get(a.name)
        return None

    @property
    def out_shape(self) -> Optional[tuple[int, ...]]:
        return self.shape(self.node)

    def item_shapes(self, a: fx.Node) -> Optional[list]:
        """Shapes of the items of a node whose output is a tuple/list: one level, so an item that
        is a container itself reads as None (:meth:`record` and :meth:`item_leaves` see into
        it)."""
        s = self._shapes.get(a.name)
        if not isinstance(s, list):
            return None
        return s if all(x is None or type(x) is torch.Size for x in s) else [
            x if type(x) is torch.Size else None for x in s]

    def record(self, a: Any) -> ShapeRecord:
        """The shape record of node ``a`` (:data:`ShapeRecord`, nested containers included)."""
        return self._shapes.get(a.name) if isinstance(a, fx.Node) else None

    def item_leaves(self, a: fx.Node) -> list[tuple[tuple, tuple[int, ...]]]:
        """``(path, shape)`` of every tensor inside container node ``a``'s output, at any depth
        (empty for a tensor node)."""
        s = self.record(a)
        return [] if isinstance(s, torch.Size) else [
            (p, tuple(x)) for p, x in record_leaves(s)]

    def take_item(self, src: fx.Node, k: Any) -> Iterator[Couple]:
        """Couple item ``k`` of container node ``src`` to this node's output (``src[k]``): dim by
        dim for a tensor item, leaf by leaf for an item that is a container again."""
        rec = self.record(src)
        if isinstance(rec, list) and type(k) is int and rec:
            k %= len(rec)
        item = record_at(rec, (k,))
        if isinstance(item, torch.Size):
            if self.out_shape is not None:
                for d in range(len(self.out_shape)):
                    yield Couple(Space.item(src.name, k, d), self.out(d))
            return
        own = self.record(self.node)
        for path, s in record_leaves(item):
            if isinstance(record_at(own, path), torch.Size):
                for d in range(len(s)):
                    yield Couple(Space.item(src.name, (k,) + path, d),
                                 Space.item(self.node.name, path, d))

    def space(self, a: Any, dim: int) -> Space:
        s = self.shape(a)
        nd = len(s) if s is not None else dim + 1
        return Space.of_node(a, dim % nd)

    def out(self, dim: int) -> Space:
        return self.space(self.node, dim)

    def item(self, k: ItemIndex, dim: int) -> Space:
        """Dim ``dim`` of item ``k`` (a key, or a path into nested containers) of this node's
        output."""
        s = record_at(self._shapes.get(self.node.name), k if type(k) is tuple else (k,))
        nd = len(s) if isinstance(s, torch.Size) else dim + 1
        return Space.item(self.node.name, k, dim % nd)

    def param(self, name: str, dim: int) -> Space:
        """The space of ``self.module``'s parameter/buffer ``name`` along ``dim``."""
        t = getattr(self.module, name)
        qual = f"{self.module_path}.{name}" if self.module_path else name
        return Space.param(qual, dim % t.dim())

    def has_param(self, name: str) -> bool:
        return isinstance(getattr(self.module, name, None), torch.Tensor)

    def identity(self, a: Any, b: Any, dims: Optional[Sequence[int]] = None) -> Iterator[Couple]:
        """Couple dims ``dims`` (default: all) of tensor nodes ``a`` and ``b`` index by index."""
        sa, sb = self.shape(a), self.shape(b)
        if sa is None or sb is None:
            return
        for d in dims if dims is not None else range(len(sa)):
            yield Couple(self.space(a, d), self.space(b, d))

    def freeze(self, a: Any, reason: str, dims: Optional[Sequence[int]] = None) -> Iterator[Freeze]:
        s = self.shape(a)
        if s is None:
            return
        for d in dims if dims is not None else range(len(s)):
            yield Freeze(self.space(a, d), reason)

    def freeze_call(self, reason: str) -> Iterator[Freeze]:
        """Freeze every dim of the node's inputs and output (the items of a tuple output too):
        a module call kept whole."""
        for path, s in self.item_leaves(self.node):
            for d in range(len(s)):
                yield Freeze(Space.item(self.node.name, path, d), reason)
        yield from self.freeze(self.node, reason)
        for a in self.node.all_input_nodes:
            yield from self.freeze(a, reason)


def tensor_inputs(node: fx.Node, shapes: dict[str, Any]) -> list[fx.Node]:
    """Every input node of ``node`` whose value is a tensor or a tuple of tensors."""
    out: list[fx.Node] = []
    for a in node.all_input_nodes:
        if a.name in shapes and shapes[a.name] is not None and a not in out:
            out.append(a)
    return out


def head_dim_of(operands: list[Any], shapes: dict[str, tuple[int, ...]]) -> list[Space]:
    """Dim -3 (heads, in ``(..., H, T, D)``) of each operand, where every operand has rank >= 4."""
    dims = [shapes.get(a.name) if isinstance(a, fx.Node) else None for a in operands]
    if not operands or any(d is None or len(d) < 4 for d in dims):
        return []
    return [Space.of_node(a, len(d) - 3) for a, d in zip(operands, dims)]


_NONE = np.zeros(0, dtype=np.int64)
_NONE.flags.writeable = False


class ApplyContext:
    """What a rule's ``update`` sees while the plan is applied to one node: old and new shapes,
    the dropped indices of every space and the current values of the node's inputs."""

    def __init__(self, node: fx.Node, module: Optional[nn.Module], env: dict[fx.Node, Any],
                 shapes: dict[str, Any], dropped: dict[Space, np.ndarray]) -> None:
        self.node = node
        self.module = module
        self._env = env
        self._shapes = shapes
        self._dropped = dropped

    def value(self, a: Any) -> Any:
        """The current value of an argument (nodes are looked up; lists/tuples elementwise)."""
        if isinstance(a, fx.Node):
            return self._env.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        return a

    def dropped(self, space: Space) -> np.ndarray:
        """The indices of ``space`` the plan removes (sorted; empty if none)."""
        return self._dropped.get(space, _NONE)

    def space(self, a: fx.Node, dim: int) -> Space:
        """The space of tensor node ``a`` along ``dim`` (as :meth:`CoupleContext.space`)."""
        s = self.old_shape(a)
        return Space.of_node(a, dim % len(s) if s else dim)

    def old_shape(self, a: fx.Node) -> Optional[tuple[int, ...]]:
        """Tensor node ``a``'s shape as traced, or None if its value is not one tensor."""
        s = self._shapes.get(a.name)
        return tuple(s) if isinstance(s, torch.Size) else None

    def new_shape(self, a: fx.Node) -> Optional[tuple[int, ...]]:
        """Tensor node ``a``'s shape after the plan."""
        s = self.old_shape(a)
        if s is None:
            return None
        return tuple(n - len(self.dropped(Space.of_node(a, d))) for d, n in enumerate(s))

    def old_items(self, a: fx.Node) -> Optional[list[Optional[tuple[int, ...]]]]:
        """Shapes of the items of tuple-valued node ``a`` as traced (None for non-tensors)."""
        s = self._shapes.get(a.name)
        return [tuple(x) if isinstance(x, torch.Size) else None for x in s] if isinstance(
            s, list) else None

    def new_items(self, a: fx.Node) -> Optional[list[Optional[tuple[int, ...]]]]:
        """Shapes of the items of tuple-valued node ``a`` after the plan."""
        items = self.old_items(a)
        if items is None:
            return None
        return [None if s is None else tuple(
            n - len(self.dropped(Space.item(a.name, k, d))) for d, n in enumerate(s))
            for k, s in enumerate(items)]

    def new_record(self, a: fx.Node) -> Any:
        """Node ``a``'s shape record after the plan, shapes as tuples (nested containers
        included), or None if ``a`` holds no tensor."""
        s = self._shapes.get(a.name)
        if isinstance(s, torch.Size):
            return self.new_shape(a)
        return map_record(s, lambda path, shape: tuple(
            n - len(self.dropped(Space.item(a.name, path, d))) for d, n in enumerate(shape)))

    def emit(self, fn: Callable[..., Any], *args: Any) -> fx.Node:
        """A new ``fn(*args)`` node right before this one (a size computed from traced sizes),
        with its value computed now, as the pass has gone past where it is inserted."""
        with self.node.graph.inserting_before(self.node):
            new = self.node.graph.call_function(fn, args)
        self._env[new] = fn(*self.value(args))
        return new

    def set_arg(self, i: int, name: str, value: Any) -> None:
        """Replace positional argument ``i`` (or keyword ``name``) of the node's call."""
        n = self.node
        if len(n.args) > i:
            args = list(n.args)
            args[i] = value
            n.args = tuple(args)
        else:
            kwargs = dict(n.kwargs)
            kwargs[name] = value
            n.kwargs = kwargs


class MacContext:
    """What a rule's :meth:`OpRule.macs` sees for one call: the shapes of its operands and of its
    module's parameters, either as traced or at the sizes a plan would leave (``sizes``)."""

    def __init__(self, node: fx.Node, module_path: Optional[str], shapes: dict[str, Any],
                 sizes: dict[Space, int], graph_module: nn.Module) -> None:
        self.node = node
        self.module_path = module_path
        self._shapes = shapes
        self._sizes = sizes
        self._graph_module = graph_module

    def shape(self, a: Any) -> Optional[tuple[int, ...]]:
        """The shape of tensor node ``a`` at ``sizes``, or None if ``a`` is not a tensor node."""
        if not isinstance(a, fx.Node):
            return None
        s = self._shapes.get(a.name)
        if not isinstance(s, torch.Size):
            return None
        return tuple(self._sizes.get(Space.of_node(a, d), n) for d, n in enumerate(s))

    def param_shape(self, name: str) -> tuple[int, ...]:
        """The shape at ``sizes`` of the called module's parameter ``name``."""
        qual = f"{self.module_path}.{name}" if self.module_path else name
        t = self._graph_module.get_parameter(qual)
        return tuple(self._sizes.get(Space.param(qual, d), n) for d, n in enumerate(t.shape))
