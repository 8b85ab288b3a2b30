"""The fx :class:`Tracer` whose leaves are the modules we have rules for.

Its leaves are every module that has a rule (conv, linear, norms, ...), PyTorch's own leaf modules
and the modules the user names; a module whose rule decomposes (``nn.MultiheadAttention``) is
traced through the rule's functional equivalent, so that its heads become visible (and prunable)
in the graph. :func:`structprune.graph.capture.capture` runs it.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..rules import OpRule, RuleKey, module_rule


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

    def trace(self, root: Any, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
        """fx's trace, leaving ``root``'s buffers as they were: fx hands the traced forward the
        real buffers, and code that updates one in place runs for real (timm's BatchNormAct2d
        in train mode counts ``num_batches_tracked.add_(1)``)."""
        buffers = [(b, b.clone()) for b in root.buffers()] if isinstance(root, nn.Module) else []
        try:
            return super().trace(root, concrete_args)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    if not torch.equal(b, saved):
                        b.copy_(saved)

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
