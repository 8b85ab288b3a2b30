"""Smoke test of benchmarks/gnn_coverage.py: its case table covers every PyG conv class, its
case builder makes nets that run, and a row has the keys the report reads. Torch-Pruning and
ONNX are not needed (``tp=False, onnx=False``)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytest.importorskip("torch_geometric")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "gnn_coverage", os.path.join(ROOT, "benchmarks", "gnn_coverage.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_every_conv_class_is_a_case_or_skipped_with_a_reason(bench):
    import torch_geometric.nn.conv as conv

    cases, skipped = bench.all_cases()
    names = {c.name for c in cases}
    for name in conv.__all__:
        assert (name in names) != (name in skipped), name
        if name in skipped:  # a table entry, not the fallback for classes the table misses
            assert name in bench.SKIP and bench.SKIP[name], name
    assert {"GCN", "GAT[heads=2]", "GIN-graph-classifier[GraphNorm+add-pool]"} <= names


@pytest.mark.parametrize("name", ["GCNConv", "GATConv", "GINConv"])
def test_case_builds_runs_and_reports(bench, name):
    import torch

    case = next(c for c in bench.all_cases()[0] if c.name == name)
    net = bench.build_net(case)
    for graph in (bench.SMALL, bench.BIG):
        nodes = graph[0]
        out = net(*bench.graph_inputs(bench.make_graph(*graph), case.inputs))
        mult = bench.CONVS[name].mult
        assert out.shape == (nodes, bench.OUT * mult) and torch.isfinite(out).all()
    assert case.output(net) is net.conv2

    row = bench.run_case(case, onnx=False, tp=False, timeout=60)
    for key in ("name", "status", "groups", "params_before", "params_after", "macs_before",
                "macs_after", "oracle_max_rel_diff", "oracle_equal", "big_graph_runs",
                "frozen", "frozen_ops", "seconds"):
        assert key in row, (key, row.get("error"))
    assert row["status"] in ("pruned", "frozen", "nothing-pruned"), row.get("error")
    assert row["oracle_equal"]
    assert row["params_after"] <= row["params_before"]
    md = bench.markdown({"results": [row], "summary": bench.summarize([row], {}),
                         "skipped": {}, "frozen_by_op": bench.frozen_by_op([row]),
                         "errors": bench.errors_by_kind([row]), "torch": torch.__version__,
                         "torch_geometric": "x", "torch_pruning": None, "structprune_rev": "x"})
    assert f"| {name} | {row['status']} |" in md


def test_silently_wrong_is_classified_loudly(bench):
    """A row whose oracle mismatches without an error must count as SILENTLY-WRONG."""
    row = {"name": "X", "kind": "conv", "status": "SILENTLY-WRONG", "oracle_max_rel_diff": 0.5,
           "params_before": 10, "params_after": 5, "macs_before": 10, "macs_after": 5}
    s = bench.summarize([row], {})
    assert s["SILENTLY_WRONG"] == 1 and s["SILENTLY_WRONG_cases"] == ["X"]
