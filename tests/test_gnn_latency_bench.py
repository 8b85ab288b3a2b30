"""Smoke test of benchmarks/gnn_latency.py: its core functions on a small random graph (not Cora).

Checks that a row has every field the report reads, that the prune actually halves the MACs
(structprune's count) and the hidden width, that the message-passing element count shrinks with
the pruned channels, and that the ONNX and torch timings were taken.
"""
import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("torch_geometric")
pytest.importorskip("onnxruntime")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "benchmarks", "gnn_latency.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gnn_latency_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


ROW_KEYS = {"case", "arch", "prune", "acc_dense", "acc_pruned", "acc_finetuned", "macs_dense",
            "macs_pruned", "mac_ratio", "params_dense", "params_pruned", "param_ratio",
            "msg_elems_dense", "msg_elems_pruned", "msg_ratio", "ms", "ratio_torch",
            "ratio_vs_pyg", "ratio_ort", "onnx_exporter", "shapes_dense", "shapes_pruned", "runs",
            "ms_spread", "ratio_torch_min"}


def test_time_interleaved_runs_every_side_in_turn(bench):
    calls = []
    times = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                   runs=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_message_elements_counts_gathers_and_scatters(bench):
    from torch_geometric.nn import GCNConv

    x, edge_index = torch.randn(10, 3), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    conv = GCNConv(3, 5)
    n = bench.message_elements(conv, (x, edge_index))
    # 4 edges + 10 self loops, 5 channels: at least one gather and one scatter of 14 x 5
    assert n >= 2 * 14 * 5
    assert bench.message_elements(torch.nn.Linear(3, 5), (x,)) == 0


@pytest.mark.parametrize("case_name,onnx", [("gcn16", False), ("gat", True)])
def test_bench_case_on_random_graph(bench, tmp_path, case_name, onnx):
    """A row from the benchmark's core on a 40-node random graph (ONNX only for the GAT, whose
    dense graph needs the export wrapper, to keep the test short)."""
    torch.set_num_threads(1)
    data = bench.random_data(num_nodes=40, num_features=12, num_classes=3)
    case = next(c for c in bench.CASES if c.name == case_name)
    row = bench.bench_case(case, data, epochs=2, finetune=1, runs=3, warmup=1,
                           workdir=str(tmp_path), onnx=onnx)
    assert "error" not in row and "onnx_error" not in row, row
    keys = ROW_KEYS if onnx else ROW_KEYS - {"ratio_ort", "onnx_exporter"}
    assert keys <= set(row), keys - set(row)
    assert row["macs_pruned"] < row["macs_dense"]
    assert 0.4 <= row["mac_ratio"] <= 0.6
    assert row["params_pruned"] < row["params_dense"]
    assert row["msg_elems_pruned"] < row["msg_elems_dense"]
    w = "conv1.lin.weight"
    assert row["shapes_pruned"][w][0] == row["shapes_dense"][w][0] // 2
    assert set(row["ms"]) == {"pyg", "graph", "pruned"} | ({"ort_dense", "ort_pruned"} if onnx
                                                           else set())
    assert all(v > 0 for v in row["ms"].values())
    assert row["max_abs_diff_graph_vs_pyg"] < 1e-4
    if onnx:
        assert row["onnx_exporter"] == {"dense": "dynamo", "pruned": "dynamo"}
    assert all(0.0 <= row[k] <= 1.0 for k in ("acc_dense", "acc_pruned", "acc_finetuned"))
    md = bench.to_markdown({"rows": [row], "notes": bench.notes([row]),
                            "meta": {"data": "random", "command": "test", "torch": "t", "pyg": "p",
                                     "onnxruntime": "o", "threads": 1, "runs": 3, "warmup": 1,
                                     "epochs": 2, "finetune": 1}})
    assert f"| {case_name} |" in md and f"**{row['ratio_torch']}**" in md
