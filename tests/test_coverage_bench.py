"""Smoke test of benchmarks/coverage_zoos.py (the reach zoos of benchmarks/coverage.py): a row,
the summary, the goal lines and the markdown on pure-torch models (always), the worker
subprocess, and one Hugging Face tiny config when transformers is installed. Needs neither
torchvision nor timm."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = ("model", "status", "capture", "frozen", "macs_before", "macs_after",
            "mac_reduction_pct", "oracle_max_diff", "oracle_equal", "second", "onnx", "returned",
            "hook_mac_reduction_pct", "seconds", "times", "tp")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "coverage_zoos", os.path.join(ROOT, "benchmarks", "coverage_zoos.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def plain_rows(bench):
    return [bench.run_case(bench.build_case("plain", name), zoo="plain")
            for name in bench.list_names("plain")]


def test_plain_rows_are_exact_and_run_at_a_second_size(bench, plain_rows):
    assert [r["model"] for r in plain_rows] == ["plain_cnn", "plain_mha"]
    for r in plain_rows:
        for key in ROW_KEYS:
            assert key in r, (key, r.get("error"))
        assert r["status"] == "oracle-equal", r.get("error")
        assert r["oracle_max_diff"] <= r["tol"]
        assert r["macs_after"] < r["macs_before"] and r["mac_reduction_pct"] >= 30
        sec = r["second"]
        assert sec["input"][0][0] == 3  # batch 2 -> 3
        assert sec["runs"] and sec["oracle_equal"] and sec["graph_equal"] and sec["shapes_equal"]
        assert bench.silently_wrong(r) == []
        assert r["onnx"] in ("pass", "fail")  # the [onnx] extra may be missing
        if r["tp"].get("ran") is not None:  # Torch-Pruning installed: it ran on the same model
            assert r["tp"]["ran"] and r["tp"]["runs"] and r["tp"]["shapes_equal"], r["tp"]
    cnn, mha = plain_rows
    assert cnn["returned"]["own_class"] and cnn["capture"] == "fx"
    # the attention's residual stream is LayerNorm'd: frozen, with the reason named
    assert any("LayerNorm" in reason for reason, _ in mha["frozen"]["top_reasons"])


def test_summary_goals_and_markdown(bench, plain_rows):
    s = bench.summarize("plain", plain_rows)
    assert s["silently_wrong"] == 0 and s["oracle_equal"] == 2 and s["failed"] == 0
    assert s["pruned_or_frozen_with_reason"] == 2 and s["macs_ge_30pct"] == 2
    assert s["second_size_runs"] == s["second_size_tried"] == 2
    lines = bench.goal_lines(s)
    assert lines[0].startswith("silently wrong") and ": 0 (goal 0)" in lines[0]
    md = bench.markdown({"summary": s, "results": plain_rows, "torch": "x"})
    assert "| plain_cnn | oracle-equal |" in md and "| plain_mha | oracle-equal |" in md
    assert "## Failures by cause" in md and "LayerNorm" in md


def test_silently_wrong_and_failures_are_classified_loudly(bench, plain_rows):
    """An oracle mismatch without an error, or a mismatch at the second size, is SILENTLY
    WRONG; errors are grouped by cause."""
    wrong = dict(plain_rows[0], model="W", status="oracle-mismatch", oracle_max_diff=0.5)
    second = dict(plain_rows[0], model="S", second=dict(plain_rows[0]["second"],
                                                         oracle_equal=False))
    failed = {"model": "F", "status": "failed", "stage": "capture",
              "error": {"type": "TraceError", "first_line": "cannot capture 'X' at line 12"}}
    s = bench.summarize("plain", [wrong, second, failed, plain_rows[1]])
    assert s["silently_wrong"] == 2 and set(s["silently_wrong_models"]) == {"W", "S"}
    assert s["failed"] == 1 and s["pruned_or_frozen_with_reason"] == 1
    assert list(s["failure_causes"]) == ["[capture] TraceError: cannot capture '…' at line N"]
    md = bench.markdown({"summary": s, "results": [wrong, second, failed]})
    assert md.count("**SILENTLY WRONG**") == 2 and "**1x** [capture] TraceError" in md


def test_a_size_refused_by_name_is_counted_apart_and_its_other_size_checked(bench, plain_rows):
    """An export-captured model that refuses the second size with structprune's own named
    check is not counted as running there; the batch-only size it then runs at is checked
    against the masked original like the first (a mismatch there is silently wrong)."""
    refusal = {"type": "AssertionError", "first_line": "this pruned M was captured by "
               "torch.export for inputs with x.size()[2] == 4, which these inputs break"}
    base = dict(plain_rows[0], capture="export")
    ok = dict(base, model="R", second=dict(base["second"], runs=False, error=refusal, other=dict(
        base["second"], runs=True, oracle_equal=True)))
    bad = dict(base, model="B", second=dict(ok["second"], other=dict(
        base["second"], runs=True, oracle_equal=False, oracle_max_diff=0.3)))
    crash = dict(base, model="C", second=dict(base["second"], runs=False, error={
        "type": "RuntimeError", "first_line": "shape mismatch"}))
    s = bench.summarize("plain", [ok, bad, crash])
    assert s["export_captured"] == 3 and s["export_captured_second_size_runs"] == 0
    assert set(s["export_captured_refused_by_name"]) == {"R", "B"}
    assert s["export_captured_refused_ran_other"] == 2
    assert set(s["silently_wrong_models"]) == {"B"}
    assert "another size: oracle 0.3" in s["silently_wrong_models"]["B"][0]
    md = bench.markdown({"summary": s, "results": [ok, crash]})
    assert "| refused; batch = |" in md and "| no |" in md


def test_worker_subprocess_writes_a_row(bench):
    args = argparse.Namespace(timeout=120.0, wall_factor=4.0, tol64=1e-5, tol32=1e-4, f32_above=50.0,
                              no_onnx=True, no_tp=True)
    r = bench.run_in_subprocess("plain", "plain_cnn", args)
    assert r["status"] == "oracle-equal", r.get("error")
    assert r["times"]["build"] >= 0 and r["onnx"] == "skipped" and "tp" not in r


def test_hf_tiny_config_without_a_wrapper(bench):
    """Runs only where transformers is installed (the plain tests above always run)."""
    pytest.importorskip("transformers")
    case = bench.build_case("hf", "BertForSequenceClassification")
    assert isinstance(case.inputs, tuple) and case.inputs[0].dtype.is_floating_point is False
    r = bench.run_case(case, onnx=False, tp=False, zoo="hf")
    assert r["status"] in ("oracle-equal", "nothing-pruned", "failed"), r
    assert bench.silently_wrong(r) == []
    if r["status"] == "failed":  # a capture the engine refuses: named, with where it failed
        assert r["error"]["type"] and r["error"]["first_line"]
    else:
        assert r["ignore"] == ["classifier"]
