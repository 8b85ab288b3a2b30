"""Every GNN of ``models/`` pruned at 50%: exact (oracle, float64) on the graph it was pruned on
and on graphs of other sizes, smaller, and exported to ONNX with open node and edge counts that
onnxruntime runs on a graph of another size."""
import os
import tempfile

import pytest
import torch

import models
import structprune as sp
from structprune.oracle import masked_output, max_rel_diff, run
from structprune.testing import assert_oracle, randomize_

pytest.importorskip("torch_geometric")
GRAPH_MODELS = models.names(kind="graph")


def inputs(name, seed, dtype=torch.float64, **cfg):
    torch.manual_seed(seed)
    return tuple(t.to(dtype) if t.is_floating_point() else t
                 for t in models.example_inputs(name, **cfg))


def test_every_paper_architecture_is_there():
    assert {"gcn", "graphsage", "gin", "gat", "gatv2", "gin_graph", "ugs_gcn"} <= set(GRAPH_MODELS)


@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_graph_model_prunes_exactly_on_any_graph(name):
    torch.manual_seed(0)
    model = randomize_(models.get(name)).double().eval()
    x = inputs(name, 0, num_nodes=14)
    pruner = sp.Pruner(model, x, ratio=0.5)
    plan = pruner.plan()
    pruned = assert_oracle(pruner, plan, tol=1e-9)
    kept = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())
    assert kept < 0.8, f"{name} kept {kept:.0%} of its parameters"
    other = inputs(name, 1, num_nodes=27)
    assert max_rel_diff(run(pruned, other), masked_output(pruner.graph, plan, other)) < 1e-9


@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_pruned_graph_model_exports_to_onnx_for_any_graph(name):
    torch.manual_seed(0)
    model = randomize_(models.get(name)).eval()
    x = inputs(name, 0, torch.float32, num_nodes=14)
    pruned = sp.prune(model, x, ratio=0.5)
    other = inputs(name, 1, torch.float32, num_nodes=31)
    with tempfile.TemporaryDirectory() as d:
        res = sp.export_onnx(pruned, x, os.path.join(d, "m.onnx"), check_inputs=[other])
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-3


def test_a_captured_graph_module_exports_as_it_is():
    """``sp.trace(...).graph_module`` (a lazily compiled capture) exports with its own
    signature, not the ``*args`` of a lazy module's copy."""
    model = models.get("gat").eval()
    x = inputs("gat", 0, torch.float32)
    gm = sp.trace(model, x).graph_module
    with tempfile.TemporaryDirectory() as d:
        res = sp.export_onnx(gm, x, os.path.join(d, "m.onnx"), check_inputs=[
            inputs("gat", 1, torch.float32, num_nodes=40)])
    assert res.exporter == "dynamo"


@pytest.mark.parametrize("arch", ["gcn", "gat"])
def test_a_gnn_exports_with_its_graph_baked_in(arch):
    """``constant_inputs=[1]``: the file holds ``edge_index`` and takes only the features;
    onnxruntime matches torch on new features for the same graph. (GAT needs the dynamo exporter
    with the remaining input's sizes open: TorchScript has no scatter_reduce without self.)"""
    import onnx

    from structprune.export.onnx import ExportError

    torch.manual_seed(0)
    model = models.get(arch).eval()
    x, edge_index = inputs(arch, 0, torch.float32, num_nodes=14)
    pruned = sp.prune(model, (x, edge_index), ratio=0.5)
    x2 = torch.randn_like(x)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        res = sp.export_onnx(pruned, (x, edge_index), path, constant_inputs=[1],
                             check_inputs=[(x2, edge_index)])
        names = [i.name for i in onnx.load(path).graph.input]
    assert names == ["input_0"] and res.max_abs_diff < 1e-4
    with pytest.raises(ExportError, match="constant_inputs"):
        sp.export_onnx(pruned, (x, edge_index), "unused.onnx", constant_inputs=[2])
