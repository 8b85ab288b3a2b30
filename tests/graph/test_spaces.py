"""Typed spaces: a space's kind and level are fields, never sigils in a string."""
import ast
import pathlib

import torch
import torch.nn as nn

import structprune as sp
from structprune.graph.coupling import SpaceTable
from structprune.rules import Level, Space, SpaceKind

ROOT = pathlib.Path(sp.__file__).parent


def test_constructors_set_kind_and_accessors_read_it():
    a = Space.activation("conv1", 1)
    i = Space.model_input("x", 0)
    t = Space.item("split", 2, 1)
    p = Space.param("layer1.0.conv1.weight", 0)
    assert [s.kind for s in (a, i, t, p)] == [SpaceKind.ACTIVATION, SpaceKind.MODEL_INPUT,
                                              SpaceKind.TUPLE_ITEM, SpaceKind.PARAMETER]
    assert all(s.level == Level.CHANNEL for s in (a, i, t, p))
    assert (a.node, i.node, t.node, p.node) == ("conv1", "x", "split", None)
    assert (a.param_name, p.param_name) == (None, "layer1.0.conv1.weight")
    assert (p.module_path, p.attr_name) == ("layer1.0.conv1", "weight")
    assert Space.param("weight", 0).module_path == ""  # a root parameter
    assert (t.item_index, a.item_index) == (2, None)
    assert [s.is_param for s in (a, i, t, p)] == [False, False, False, True]
    assert [s.is_item for s in (a, i, t, p)] == [False, False, True, False]
    assert [s.is_node_tensor for s in (a, i, t, p)] == [True, True, False, False]
    assert p.with_dim(1) == Space.param("layer1.0.conv1.weight", 1)
    assert t.with_dim(0) == Space.item("split", 2, 0)
    assert not hasattr(a, "key")  # no string key to parse


def test_kind_and_level_take_part_in_equality_and_hash():
    same_name = [Space.activation("w", 0), Space.model_input("w", 0), Space.item("w", 0, 0),
                 Space.param("w", 0)]
    assert len(set(same_name)) == 4
    node = Space.activation("x", 0, Level.GRAPH_NODE)
    edge = Space.activation("x", 0, Level.GRAPH_EDGE)
    assert len({Space.activation("x", 0), node, edge}) == 3
    assert node == Space.activation("x", 0, Level.GRAPH_NODE)
    table = SpaceTable()
    table.add(Space.activation("x", 0), 4)
    table.add(node, 7)
    assert table.size[node] == 7 and table.size[Space.activation("x", 0)] == 4


def test_str_is_readable():
    assert str(Space.activation("conv1", 1)) == "conv1[1]"
    assert str(Space.param("fc.weight", 0)) == "@fc.weight[0]"
    assert str(Space.item("split", 0, 1)) == "split#0[1]"
    assert "graph_node" in str(Space.activation("x", 0, Level.GRAPH_NODE))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(4, 2, 1)
        self.register_buffer("scale", torch.ones(1, 4, 1, 1))

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.head(torch.relu(a) * self.scale + b)


def test_a_trace_types_its_spaces():
    g = sp.trace(_Net(), torch.randn(1, 3, 5, 5))
    kinds = {s.kind for s in g.table.order}
    assert kinds == set(SpaceKind)
    x = next(n for n in g.graph_module.graph.nodes if n.op == "placeholder")
    assert Space.model_input(x.name, 1) in g.table and Space.activation(x.name, 1) not in g.table
    assert g.is_frozen(Space.model_input(x.name, 1))
    assert Space.param("conv.weight", 0) in g.table and Space.param("scale", 1) in g.table
    chunk = next(n for n in g.graph_module.graph.nodes if "chunk" in n.name)
    assert g.table.size[Space.item(chunk.name, 1, 1)] == 4
    members = [m for grp in g.groups() for m in grp.members]
    conv_w = next(m for m in members if m.space == Space.param("conv.weight", 0))
    assert (conv_w.module, conv_w.name, conv_w.qualname) == ("conv", "weight", "conv.weight")
    plan = sp.Plan(g, {grp.id: [0] for grp in g.groups() if grp.num_units > 1})
    dropped = plan.dropped_indices()
    assert any(s.is_item for s in dropped) and any(s.is_param for s in dropped)
    # the oracle's masks name whole node tensors only: items and parameters are not nodes
    want = {s.node for s in dropped if s.is_node_tensor}
    assert set(plan.activation_masks_all()) == want and chunk.name not in want


def _sigil_space_calls(tree: ast.AST) -> list[int]:
    """Lines calling ``Space(...)`` with a first argument built from a string (f-string,
    concatenation, or a literal with a sigil)."""
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "Space" and node.args):
            a = node.args[0]
            if isinstance(a, (ast.JoinedStr, ast.BinOp)) or (
                    isinstance(a, ast.Constant) and isinstance(a.value, str)
                    and a.value[:1] in ("@", "#")):
                bad.append(node.lineno)
    return bad


def test_no_module_builds_a_space_from_a_sigil_string():
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        lines = _sigil_space_calls(ast.parse(path.read_text(), str(path)))
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    assert not found, f"spaces built from strings (use Space.param/item/activation): {found}"
    # the scan itself finds the old idioms
    assert _sigil_space_calls(ast.parse('Space("@" + q, 0); Space(f"{n}#{k}", 1)')) == [1, 1]
