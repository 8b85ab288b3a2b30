"""Every registered op rule is exercised by at least one hand-built reference.

Runs every test of the hand-reference modules in this process (parametrisations expanded)
while recording the rule of every node of every graph traced, then compares the rule classes
seen with the registry. ``test_rule_table.py`` does the same for the generic oracle cases.
"""
import inspect
import itertools

import pytest

from structprune.graph import depgraph
from structprune.rules import Frozen, module_rule, registry

from . import (test_embedding_bag, test_hand_references, test_hand_references_aten,
               test_hand_references_recurrent, test_hand_references_scatter, test_head_bias,
               test_nn_transformer, test_reductions_repeat, test_rnn_modules, test_traced_slices)


def _calls(module):
    """``(test function, kwargs)`` for every test of ``module``, parametrisations expanded."""
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_") or fn.__module__ != module.__name__:
            continue
        grids = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        axes = []
        for m in grids:
            names = [n.strip() for n in m.args[0].split(",")] if isinstance(m.args[0], str) \
                else list(m.args[0])
            values = [v if len(names) > 1 else (v,) for v in m.args[1]]
            axes.append([dict(zip(names, v)) for v in values])
        for combo in itertools.product(*axes) if axes else [()]:
            kwargs = {}
            for part in combo:
                kwargs.update(part)
            yield fn, kwargs


def test_every_rule_has_a_hand_built_reference(monkeypatch):
    seen: set[type] = set()
    real_init = depgraph.DependencyGraph.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.update(type(r) for r in self.node_rules.values() if not isinstance(r, Frozen))
        # a rule that decomposes its module (nn.MultiheadAttention) shows as the ops it traced
        calls = {n.target for n in self.graph_module.graph.nodes if n.op == "call_module"}
        for path, m in self.model.named_modules():
            rule = module_rule(m, self.rules)
            if rule is not None and rule.decomposes and path not in calls:
                seen.add(type(rule))

    monkeypatch.setattr(depgraph.DependencyGraph, "__init__", recording_init)
    ran = 0
    for module in (test_hand_references, test_hand_references_aten,
                   test_hand_references_scatter, test_hand_references_recurrent,
                   test_reductions_repeat, test_traced_slices, test_head_bias,
                   test_rnn_modules, test_nn_transformer, test_embedding_bag):
        for fn, kwargs in _calls(module):
            fn(**kwargs)
            ran += 1
    assert ran >= 30
    registered = {type(r) for r in registry().values()}
    missing = sorted(c.__name__ for c in registered - seen)
    if missing:
        pytest.fail(f"rules without a hand-built reference: {missing}")
