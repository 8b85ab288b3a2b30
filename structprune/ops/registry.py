"""The op-rule registry: one :class:`OpRule` per op, keyed on the real target.

A rule owns everything the library needs to know about an op::

    couple(ctx)   which indices of its inputs, outputs and parameters are the same unit
    update(actx)  after slicing: fix module attributes (``in_channels``) and literal arguments
    macs(mctx)    multiply-accumulates of one call, from the (possibly pruned) shapes

Keys are module classes (``nn.Conv2d``), functions (``torch.cat``, ``operator.add``) or method
names (``"view"``). Anything without a rule is frozen: its tensors couple to the sentinel.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph.coupling import Couple, Freeze, Record, Space

RuleKey = Any  # a module class, a callable, or a method name


class OpRule:
    """Base class of op rules. Rules are stateless, so one instance serves every graph.

    Call tree during :func:`structprune.trace`::

        couple(ctx)  -> records (Couple / Freeze / Role / Choice)
        (dims of the node's tensors that no record mentions are frozen afterwards)

    and during apply::

        update(actx) -> edits module attributes or ``actx.node.args`` in place
    """

    #: If False, input dims the rule does not mention stay free (shape queries like ``x.size()``).
    freezes_unmentioned: bool = True
    #: False for opt-in rules whose pruning is approximate (the pruned model deviates from the
    #: masked original); the pruner then measures and reports the deviation.
    exact: bool = True

    def couple(self, ctx: "CoupleContext") -> Iterable[Record]:
        return ()

    def update(self, actx: Any) -> None:
        """Adjust module attributes or literal node arguments to the new shapes (default: none)."""

    def head_dims(self, node: fx.Node, shapes: dict[str, tuple[int, ...]]) -> list[Space]:
        """The spaces of this call's operands that are attention heads (what ``head_ratio``
        prunes apart); default: none."""
        return []

    def macs(self, mctx: Any) -> int:
        """Multiply-accumulates of one call given the shapes in ``mctx`` (default: 0)."""
        return 0


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


def _module_rule(module: nn.Module, rules: dict[RuleKey, OpRule]) -> Optional[OpRule]:
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


def has_module_rule(module: nn.Module, rules: dict[RuleKey, OpRule]) -> bool:
    return _module_rule(module, rules) is not None


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
        rule = _module_rule(module, rules)
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
        """Shapes of the items of a node whose output is a tuple/list."""
        s = self._shapes.get(a.name)
        return s if isinstance(s, list) else None

    def space(self, a: Any, dim: int) -> Space:
        s = self.shape(a)
        nd = len(s) if s is not None else dim + 1
        return Space.of_node(a, dim % nd)

    def out(self, dim: int) -> Space:
        return self.space(self.node, dim)

    def item(self, k: int, dim: int) -> Space:
        shapes = self.item_shapes(self.node) or []
        nd = len(shapes[k]) if k < len(shapes) and shapes[k] is not None else dim + 1
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
