"""The command line: prune -> report -> export on a reference model, --json, exit codes."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "structprune.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_prune_report_export(tmp_path):
    sp_file, onnx_file = str(tmp_path / "r.sp"), str(tmp_path / "r.onnx")
    out = cli("prune", "models.cifar_resnet:resnet20", "--shape", "2,3,32,32", "--ratio", "0.5",
              "--ignore", "fc", "-o", sp_file, "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["output"] == sp_file and d["macs"]["kept"] < 0.3 and os.path.exists(sp_file)
    out = cli("report", "models.cifar_resnet:resnet20", "--shape", "2,3,32,32", "--pruned", sp_file)
    assert out.returncode == 0 and "MACs" in out.stdout
    out = cli("export", sp_file, "--shape", "2,3,32,32", "-o", onnx_file, "--json",
              cwd=str(tmp_path))  # no model code needed
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["max_abs_diff"] < 1e-4 and os.path.exists(onnx_file)


def test_errors_and_usage():
    out = cli("prune", "models.cifar_resnet:resnet20", "--shape", "2,3,32,32", "--ratio", "2",
              "-o", "/tmp/x.sp")
    assert out.returncode == 1 and "ratio must be a number in [0, 1)" in out.stderr
    out = cli("prune", "models.cifar_resnet:resnet20", "--shape", "2,3,32,32", "--ignore", "nope",
              "-o", "/tmp/x.sp")
    assert out.returncode == 1 and "'nope' is not a submodule" in out.stderr
    assert cli("frobnicate").returncode == 2
    out = cli("--help")
    assert out.returncode == 0 and "prune" in out.stdout and "export" in out.stdout
