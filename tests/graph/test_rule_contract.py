"""The rule contract lives in structprune.rules: graph/ and ops/ meet only there, and a rule (not
the tracer) says whether its module is a leaf or traced through."""
import ast
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.ops.attention import MultiheadAttentionRule
from structprune.rules import Couple, OpRule, Space
from structprune.testing import assert_oracle

ROOT = pathlib.Path(sp.__file__).parent


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (lazy ones inside functions too)."""
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if not node.module else base)
                    for a in node.names]
    return out


def _crossings(package: str, other: str) -> dict[str, list[int]]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        lines = [ln for ln, mod in _imports(path)
                 if mod == f"structprune.{other}" or mod.startswith(f"structprune.{other}.")]
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    return found


def test_graph_imports_nothing_from_ops():
    assert _crossings("graph", "ops") == {}


def test_ops_imports_nothing_from_graph():
    assert _crossings("ops", "graph") == {}


def test_rules_module_is_below_graph_and_ops():
    mods = [m for _, m in _imports(ROOT / "rules.py")]
    assert not [m for m in mods if m.startswith(("structprune.graph", "structprune.ops"))]


def test_the_scan_sees_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "structprune" / "graph"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("from ..ops.registry import lookup\ndef g():\n    from ..ops import attention\n")
    global ROOT
    old, ROOT = ROOT, tmp_path / "structprune"
    try:
        assert _crossings("graph", "ops") == {"graph/x.py": [1, 3]}
    finally:
        ROOT = old


class _Scaled(nn.Module):
    """A module fx cannot trace (its forward branches on a tensor's value)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: symbolic tracing fails here
            return x
        return F.relu(self.lin(x))


class _ScaledRule(OpRule):
    """Traces ``_Scaled`` through its functional equivalent."""

    decomposes = True

    def trace_through(self, module, getp, x):
        return F.relu(F.linear(x, getp("lin.weight"), getp("lin.bias")))


def test_a_rule_decides_that_the_tracer_decomposes_its_module():
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    g = sp.trace(model, x, rules={_Scaled: _ScaledRule()})
    ops = [n.op for n in g.graph_module.graph.nodes]
    assert "get_attr" in ops and not any(n.op == "call_module" and n.target == "0"
                                         for n in g.graph_module.graph.nodes)
    assert [grp.num_units for grp in g.groups()] == [8]  # the hidden width, through F.linear
    pruner = sp.Pruner(model, x, ratio=0.5, importance="random", rules={_Scaled: _ScaledRule()})
    pruned = assert_oracle(pruner, pruner.plan())  # pruned == masked original
    assert pruned(x).shape == (4, 3)


class _Attn(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kw)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h)[0])


def test_multihead_attention_is_decomposed_by_its_rule_or_kept_whole_with_a_reason():
    assert MultiheadAttentionRule.decomposes
    x = torch.randn(2, 5, 6)
    g = sp.trace(_Attn().eval(), x)
    assert not any(n.op == "call_module" and n.target == "attn" for n in g.graph_module.graph.nodes)
    assert g.head_groups()
    for model, kw in ((_Attn(add_zero_attn=True), {}),
                      (_Attn(), {"leaf_modules": [nn.MultiheadAttention]})):
        g = sp.trace(model.eval(), x, **kw)
        node = next(n for n in g.graph_module.graph.nodes
                    if n.op == "call_module" and n.target == "attn")
        assert isinstance(g.node_rules[node.name], MultiheadAttentionRule)
        assert any(e.node == node.name and "kept whole" in e.reason for e in g.frozen())
        assert not g.head_groups()


def test_records_and_contexts_come_from_the_contract_module():
    import structprune.graph.coupling as coupling
    import structprune.ops as ops
    import structprune.rules as rules

    assert coupling.Space is rules.Space and coupling.Couple is rules.Couple
    assert ops.OpRule is rules.OpRule and ops.register is rules.register
    assert Couple(Space.activation("a", 0), Space.param("w", 1)).b.is_param
