"""sp.save / sp.load for pruned PyG models and torch.export captures, and the allow-list of
what a file may name."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import (MLP, BatchNorm, GCNConv, GINConv, GraphNorm,  # noqa: E402
                                global_add_pool)
from torch_geometric.nn import Linear as PygLinear  # noqa: E402

import models  # noqa: E402
import structprune as sp  # noqa: E402
from structprune.export.onnx import captured_axes  # noqa: E402
from structprune.io import ALLOWED, SerializationError  # noqa: E402
from structprune.testing import randomize_  # noqa: E402

NAMES = ["input_0", "input_1", "input_2"]


def _placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


@pytest.mark.parametrize("name", models.names(kind="graph"))
def test_pruned_gnn_round_trips_on_graphs_of_any_size(tmp_path, name):
    torch.manual_seed(0)
    model = models.get(name).eval()
    inputs = models.example_inputs(name)
    pruned = sp.prune(model, inputs, ratio=0.5)
    assert pruned.meta["structprune_capture"] == "export"
    path = str(tmp_path / "m.sp")
    sp.save(pruned, path)
    again = sp.load(path)
    other = models.example_inputs(name, num_nodes=inputs[0].shape[0] + 17)
    with torch.no_grad():
        for x in (inputs, other):
            assert torch.equal(again(*x), pruned(*x))
    assert {k: v for k, v in again.meta.items() if k.startswith("structprune_")} == \
        {k: v for k, v in pruned.meta.items() if k.startswith("structprune_")}
    # The open sizes come back as symbols: node and edge counts, the same symbol where the
    # capture found two sizes equal (x's nodes and batch's entries).
    axes = captured_axes(again, NAMES)
    assert axes == captured_axes(pruned, NAMES) and axes["input_0"] == {0: "input_0_dim0"}
    assert axes["input_1"] == {1: "input_1_dim1"}
    for a, b in zip(_placeholders(again), _placeholders(pruned)):
        va, vb = a.meta.get("val"), b.meta.get("val")
        assert (va is None) == (vb is None)
        if vb is not None:
            assert va.dtype == vb.dtype and len(va.shape) == len(vb.shape)


class GraphClassifier(nn.Module):
    """GraphNorm and global pooling read ``int(batch.max()) + 1``."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = GCNConv(8, 16), GraphNorm(16)
        self.c2 = GINConv(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)))
        self.head = nn.Linear(16, 3)

    def forward(self, x, edge_index, batch):
        h = F.relu(self.n1(self.c1(x, edge_index), batch))
        return self.head(global_add_pool(self.c2(h, edge_index), batch))


def batched(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, eis, bs, off = [], [], [], 0
    for k, n in enumerate(sizes):
        xs.append(torch.randn(n, 8, generator=g))
        eis.append(torch.randint(0, n, (2, 3 * n), generator=g) + off)
        bs.append(torch.full((n,), k))
        off += n
    return torch.cat(xs), torch.cat(eis, 1), torch.cat(bs)


def test_graph_classifier_round_trips_and_exports_with_open_axes(tmp_path):
    torch.manual_seed(0)
    model = randomize_(GraphClassifier()).eval()
    inputs, other = batched([5, 7]), batched([4, 9, 6], seed=5)
    pruned = sp.prune(model, inputs, ratio=0.5)
    sp.save(pruned, str(tmp_path / "g.sp"))
    again = sp.load(str(tmp_path / "g.sp"))
    assert again.meta["structprune_capture"] == "export"
    with torch.no_grad():
        assert torch.equal(again(*inputs), pruned(*inputs))
        assert torch.equal(again(*other), pruned(*other))
        assert again(*other).shape == (3, 3)
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    res = sp.export_onnx(again, inputs, str(tmp_path / "g.onnx"), check_inputs=[other])
    assert res.max_abs_diff < 1e-4
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(tmp_path / "g.onnx")).graph.input]
    assert isinstance(dims[0][0], str) and dims[0][1] == 8  # nodes open, features fixed
    assert dims[1][0] == 2 and isinstance(dims[1][1], str)  # edges open
    assert dims[2][0] == dims[0][0]  # batch has one entry per node
    # A loaded model saves again with the same open sizes.
    sp.save(again, str(tmp_path / "g2.sp"))
    assert captured_axes(sp.load(str(tmp_path / "g2.sp")), NAMES) == \
        captured_axes(pruned, NAMES) == {"input_0": {0: "input_0_dim0"},
                                         "input_1": {1: "input_1_dim1"},
                                         "input_2": {0: "input_0_dim0"}}


class PygBlocks(nn.Module):
    """PyG layers fx traces through: the pruned model keeps the user's class."""

    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.mlp = PygLinear(8, 16), BatchNorm(16), MLP([16, 16, 16])
        self.l2 = PygLinear(16, 4)

    def forward(self, x):
        return self.l2(self.mlp(F.relu(self.bn(self.l1(x)))))


def test_users_class_with_pyg_layers_saves_through_fx(tmp_path):
    torch.manual_seed(0)
    model = randomize_(PygBlocks()).eval()
    x = torch.randn(10, 8)
    pruned = sp.prune(model, x, ratio=0.5)
    assert type(pruned) is PygBlocks and pruned.l1.weight.shape[0] == 8
    sp.save(pruned, str(tmp_path / "p.sp"))
    again = sp.load(str(tmp_path / "p.sp"))
    assert type(again).__name__ == "PygBlocks"
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_a_graph_naming_pyg_layers_loads(tmp_path):
    """PyG layers left whole in a graph (a leaf of the user's tracer) are named in the file:
    torch_geometric is on the allow-list."""
    class Leaves(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (GraphNorm, PygLinear)) or super().is_leaf_module(m, qualname)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = PygLinear(8, 6), GraphNorm(6)

        def forward(self, x, batch):
            return self.norm(self.lin(x), batch)

    m = randomize_(Net()).eval()
    gm = fx.GraphModule(m, Leaves().trace(m))
    sp.save(gm, str(tmp_path / "l.sp"))
    again = sp.load(str(tmp_path / "l.sp"))
    assert type(again.norm) is GraphNorm and type(again.lin) is PygLinear
    x, b = torch.randn(7, 8), torch.tensor([0, 0, 0, 1, 1, 1, 1])
    with torch.no_grad():
        assert torch.equal(again(x, b), gm(x, b))


# --- the allow-list ----------------------------------------------------------------------------
@pytest.fixture
def allow_list():
    """ALLOWED as it was before the test."""
    saved = (set(ALLOWED.packages), set(ALLOWED.objects))
    yield ALLOWED
    ALLOWED.packages, ALLOWED.objects = saved


def _edit(path, out, edit):
    with safe_open(path, framework="pt") as f:
        spec = json.loads(f.metadata()["structprune"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(spec)
    save_file(tensors, out, metadata={"structprune": json.dumps(spec)})
    return out


def _relu_graph(tmp_path):
    g = fx.Graph()
    g.output(g.call_function(torch.relu, (g.placeholder("x"),)))
    gm = fx.GraphModule(nn.Module(), g)
    sp.save(gm, str(tmp_path / "f.sp"))
    return str(tmp_path / "f.sp")


@pytest.mark.parametrize("target", ["os:system", "torch:os.system", "builtins:exec",
                                    "torch:load", "builtins:getattr.__self__"])
def test_a_file_naming_code_outside_the_allow_list_is_refused(tmp_path, target):
    def edit(spec):
        (node,) = [n for n in spec["graph"] if n["op"] == "call_function"]
        node["target"] = {"fn": target}
    bad = _edit(_relu_graph(tmp_path), str(tmp_path / "bad.sp"), edit)
    with pytest.raises(SerializationError, match=f"refusing to import {target}.*sp.io.allow"):
        sp.load(bad)


@pytest.mark.parametrize("case", ["module_value", "dunder_getattr", "operator_call",
                                  "fake_dtype", "dunder_method"])
def test_a_graph_cannot_reach_past_the_allow_list_through_values(tmp_path, case):
    """Names inside a graph that would lead from allowed objects to others are refused:
    a module as a value, dunder attributes, operator.call, a 'dtype' that is a function."""
    def edit(spec):
        (node,) = [n for n in spec["graph"] if n["op"] == "call_function"]
        if case == "module_value":
            node["args"] = [{"fn": "torch:nn"}]
        elif case == "dunder_getattr":
            node["target"], node["args"] = {"fn": "builtins:getattr"}, [{"node": "x"},
                                                                        "__class__"]
        elif case == "operator_call":
            node["target"] = {"fn": "_operator:call"}
        elif case == "fake_dtype":
            node["kwargs"] = {"dict": [["dtype", {"dtype": "load"}]]}
        else:
            node["op"], node["target"] = "call_method", "__reduce_ex__"
    bad = _edit(_relu_graph(tmp_path), str(tmp_path / "bad.sp"), edit)
    with pytest.raises(SerializationError, match=r"module, not a class|attribute name|"
                                                 r"refusing to import _operator:call|"
                                                 r"not a torch\.dtype"):
        sp.load(bad)


MYPKG = '''
import torch.nn as nn


class Thing(nn.Module):
    """Harmless: scales its input."""

    def __init__(self, factor=2.0):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor
'''


def test_a_package_outside_the_allow_list_is_refused_unimported_until_allowed(
        tmp_path, monkeypatch, allow_list):
    (tmp_path / "mypkg_io_test").mkdir()
    (tmp_path / "mypkg_io_test" / "__init__.py").write_text(MYPKG)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mypkg_io_test

    g = fx.Graph()
    g.output(g.call_module("thing", (g.placeholder("x"),)))
    root = nn.Module()
    root.thing = mypkg_io_test.Thing(3.0)
    gm = fx.GraphModule(root, g)
    with pytest.raises(SerializationError, match=r"mypkg_io_test\.Thing.*sp\.io\.allow"):
        sp.save(gm, str(tmp_path / "t.sp"))  # not by default: a file could not be loaded
    sp.io.allow("mypkg_io_test")
    sp.save(gm, str(tmp_path / "t.sp"))
    allow_list.packages.discard("mypkg_io_test")  # a fresh session, which has not allowed it
    monkeypatch.delitem(sys.modules, "mypkg_io_test")
    with pytest.raises(SerializationError) as info:
        sp.load(str(tmp_path / "t.sp"))
    msg = str(info.value)
    assert "refusing to import mypkg_io_test:Thing" in msg
    assert "sp.io.allow('mypkg_io_test')" in msg and len(msg) < 500
    assert "mypkg_io_test" not in sys.modules  # load imported nothing outside the list
    sp.io.allow("mypkg_io_test:Thing")  # this one object
    again = sp.load(str(tmp_path / "t.sp"))
    assert type(again.thing).__name__ == "Thing" and again.thing.factor == 3.0
    assert torch.equal(again(torch.ones(2)), torch.full((2,), 3.0))


def test_allow_takes_a_package_an_object_path_or_the_object(allow_list):
    sp.io.allow("mypkg_a", "mypkg_b.layers:Thing", GraphClassifier)
    assert allow_list.allows("mypkg_a.sub:Any")
    assert allow_list.allows("mypkg_b.layers:Thing") and not allow_list.allows("mypkg_b:Other")
    assert allow_list.allows(f"{GraphClassifier.__module__}:GraphClassifier")
    with pytest.raises(ValueError, match="package name"):
        sp.io.allow("a:b:c")
    with pytest.raises(ValueError, match="module-level"):
        sp.io.allow(lambda x: x)


def test_an_export_captured_file_loads_without_torch_geometric(tmp_path):
    torch.manual_seed(0)
    model = models.get("gcn").eval()
    inputs = models.example_inputs("gcn")
    other = models.example_inputs("gcn", num_nodes=inputs[0].shape[0] + 9)
    pruned = sp.prune(model, inputs, ratio=0.5)
    sp.save(pruned, str(tmp_path / "m.sp"))
    torch.save({"inputs": inputs, "other": other, "y": pruned(*inputs), "y2": pruned(*other)},
               tmp_path / "data.pt")
    code = ("import sys, torch, structprune as sp; m = sp.load('m.sp'); "
            "d = torch.load('data.pt'); "
            "assert torch.equal(m(*d['inputs']), d['y']) and torch.equal(m(*d['other']), d['y2']); "
            "print('PYG' if any(k.split('.')[0] == 'torch_geometric' for k in sys.modules) "
            "else 'NO PYG', m.meta['structprune_capture'])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NO PYG export" in out.stdout
