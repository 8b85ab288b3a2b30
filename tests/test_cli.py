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


# --- in-process: user mistakes, factory arguments, seeds, JSON errors, warnings ----------------
import textwrap  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import structprune as sp  # noqa: E402
from structprune import cli as cli_mod  # noqa: E402

FACTORIES = textwrap.dedent("""
    import torch
    import torch.nn as nn


    def build(width=4, act="relu", bias=True):
        acts = {"relu": nn.ReLU(), "gelu": nn.GELU()}
        return nn.Sequential(nn.Linear(6, width, bias=bias), acts[act], nn.Linear(width, 3))


    def with_inputs():
        return build(), torch.randn(2, 6)


    def broken():
        raise ValueError("no weights at /data/w.pt")


    def not_a_model():
        return 42


    def lstm_only():
        return nn.LSTM(6, 5, batch_first=True)
""")


@pytest.fixture
def run_cli(tmp_path, monkeypatch, capsys):
    """Run ``main`` in this process; return (exit code, stdout, stderr)."""
    # Absent during the test, restored afterwards (a bare delenv of an unset variable records
    # nothing to undo).
    monkeypatch.setenv("STRUCTPRUNE_DEBUG", "")
    monkeypatch.delenv("STRUCTPRUNE_DEBUG")
    (tmp_path / "factories.py").write_text(FACTORIES)

    def run(*args):
        try:
            code = cli_mod.main([a.replace("F.py", str(tmp_path / "factories.py")) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize("args, message", [
    (["nosuch.module:build"], "cannot import 'nosuch.module': No module named 'nosuch'"),
    (["missing.py:build"], "no such file: missing.py"),
    (["F.py:nosuch"], "has no callable 'nosuch'; it has: "),
    (["F.py:broken"], "the factory F.py:broken raised ValueError: no weights at /data/w.pt "
                      "(pass its arguments with --arg key=value)"),
    (["F.py:not_a_model"], "F.py:not_a_model gave a int, not an nn.Module"),
    (["F.py:build", "--arg", "nope=1"], "unexpected keyword argument 'nope'"),
    (["F.py:build", "-o", "/nonexistent/dir/x.sp"], "the folder '/nonexistent/dir' does not exist"),
])
def test_user_mistakes_are_one_message_and_a_json_error(run_cli, tmp_path, args, message):
    out_file = [] if "-o" in args else ["-o", str(tmp_path / "o.sp")]
    full = ["prune", *args, "--shape", "2,6", *out_file]
    message = message.replace("F.py", str(tmp_path / "factories.py"))
    code, out, err = run_cli(*full)
    assert code == 1 and "Traceback" not in err and message in err, err
    assert err.startswith("structprune: error: ") and len(err.splitlines()) == 1
    code, out, err = run_cli(*full, "--json")
    assert code == 1 and json.loads(out)["error"]["message"] == err.splitlines()[0][20:]
    assert json.loads(out)["error"]["type"] in ("StructpruneError", "ModelError")


def test_bad_usage_exits_2_with_the_option_named(run_cli, tmp_path):
    for bad, said in [(["--shape", "2,x"], "argument --shape: '2,x' is not a shape"),
                      (["--arg", "width"], "argument --arg: 'width' is not key=value"),
                      (["--kwargs", "{width: 1}"], "argument --kwargs: not JSON")]:
        code, out, err = run_cli("prune", "F.py:build", "-o", str(tmp_path / "o.sp"), *bad)
        assert code == 2 and said in err and "Traceback" not in err, err
    code, out, err = run_cli("prune", "F.py:build", "--shape", "2,x", "--json")
    assert code == 2 and json.loads(out)["error"]["type"] == "UsageError"


def test_help_documents_exit_codes_and_factory_arguments(run_cli):
    code, out, _ = run_cli("prune", "--help")
    assert code == 0
    for text in ("exit codes:", "0  success", "2  bad usage", "3  prune only: nothing",
                 "--allow-noop", "--kwargs '{\"num_classes\": 10", "--arg num_classes=10",
                 "STRUCTPRUNE_DEBUG=1"):
        assert text in out


def test_factory_keyword_arguments(run_cli):
    code, out, err = run_cli("report", "F.py:build", "--shape", "2,6", "--json",
                             "--kwargs", '{"width": 16, "act": "relu"}', "--arg", "act='gelu'",
                             "--arg", "bias=False")
    assert code == 0, err
    assert json.loads(out)["params"]["before"] == 6 * 16 + 16 * 3 + 3  # width 16, no first bias
    code, out, err = run_cli("report", "F.py:with_inputs", "--json")  # the factory's own inputs
    assert code == 0 and json.loads(out)["params"]["before"] == 6 * 4 + 4 + 4 * 3 + 3


def test_seed_makes_runs_repeatable(run_cli, tmp_path):
    def pruned_weights(seed, name):
        path = str(tmp_path / name)
        code, _, err = run_cli("prune", "F.py:build", "--arg", "width=16", "--shape", "2,6",
                               "--importance", "random", "--seed", str(seed), "-o", path)
        assert code == 0, err
        return sp.load(path).state_dict()

    a, b, c = pruned_weights(3, "a.sp"), pruned_weights(3, "b.sp"), pruned_weights(4, "c.sp")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_debug_shows_the_traceback(run_cli, tmp_path):
    code, _, err = run_cli("prune", "F.py:broken", "--shape", "2,6", "-o", str(tmp_path / "o.sp"),
                           "--debug")
    assert code == 1 and "Traceback" in err and 'raise ValueError("no weights' in err


def test_debug_lasts_one_call(run_cli, tmp_path, monkeypatch):
    # main() run in-process must not leave the library in debug mode: it used to set
    # STRUCTPRUNE_DEBUG for good, and every later capture error in the process (another test in
    # the same xdist worker) then carried torch's full texts, hundreds of lines.
    from structprune.diagnostics import debug_enabled

    args = ("prune", "F.py:broken", "--shape", "2,6", "-o", str(tmp_path / "o.sp"))
    assert run_cli(*args, "--debug")[0] == 1
    assert "STRUCTPRUNE_DEBUG" not in os.environ and not debug_enabled()
    code, _, err = run_cli(*args)
    assert code == 1 and "Traceback" not in err
    monkeypatch.setenv("STRUCTPRUNE_DEBUG", "yes")  # set by the user: kept as it was
    assert run_cli(*args, "--debug")[0] == 1 and os.environ["STRUCTPRUNE_DEBUG"] == "yes"


def _warning_prune(*categories):
    def prune(model, x, **kwargs):
        for c in categories:
            warnings.warn(f"{c.__name__} says hello", c)
        return model
    return prune


def test_nothing_pruned_exits_3_unless_allowed(run_cli, tmp_path, monkeypatch):
    import structprune.pruner

    out_file = str(tmp_path / "o.sp")
    monkeypatch.setattr(structprune.pruner, "prune",
                        _warning_prune(sp.StructpruneWarning, sp.NothingPrunedWarning))
    code, out, err = run_cli("prune", "F.py:build", "--shape", "2,6", "-o", out_file)
    assert code == 3, err
    assert not os.path.exists(out_file)
    assert "structprune: warning: NothingPrunedWarning says hello" in err
    assert "structprune: warning: StructpruneWarning says hello" in err
    assert "--allow-noop" in err and "UserWarning" not in err and ".py:" not in err
    code, out, err = run_cli("prune", "F.py:build", "--shape", "2,6", "-o", out_file, "--json")
    assert code == 3 and [w["type"] for w in json.loads(out)["warnings"]] == [
        "StructpruneWarning", "NothingPrunedWarning"]
    code, out, err = run_cli("prune", "F.py:build", "--shape", "2,6", "-o", out_file,
                             "--allow-noop")
    assert code == 0 and "NothingPrunedWarning says hello" in err and os.path.exists(out_file)
    # Other warnings alone: printed readably, exit 0.
    monkeypatch.setattr(structprune.pruner, "prune", _warning_prune(sp.StructpruneWarning))
    code, out, err = run_cli("prune", "F.py:build", "--shape", "2,6", "-o", out_file)
    assert code == 0 and err.strip() == "structprune: warning: StructpruneWarning says hello"


def test_a_model_with_nothing_to_prune_exits_3(run_cli, tmp_path):
    # nn.LSTM has no rule: the prune removes nothing, which the library reports as
    # NothingPrunedWarning and the CLI turns into exit code 3.
    code, out, err = run_cli("prune", "F.py:lstm_only", "--shape", "2,4,6",
                             "-o", str(tmp_path / "o.sp"))
    assert code == 3, err
    assert "structprune: warning:" in err and "Traceback" not in err


def test_allow_noop_writes_a_model_that_only_torch_export_captures(run_cli, tmp_path):
    # Nothing prunes, so sp.prune hands back the LSTM itself; fx cannot trace nn.LSTM's forward
    # (it branches on input.dim()), so saving it needs the example inputs for torch.export.
    out_file = str(tmp_path / "o.sp")
    code, out, err = run_cli("prune", "F.py:lstm_only", "--shape", "2,4,6", "--seed", "1",
                             "-o", out_file, "--allow-noop", "--json")
    assert code == 0, err
    assert json.loads(out)["output"] == out_file and os.path.exists(out_file)
    assert [w["type"] for w in json.loads(out)["warnings"]] == ["NothingPrunedWarning"]
    torch.manual_seed(1)  # --seed 1 seeds before the factory builds the model
    model = torch.nn.LSTM(6, 5, batch_first=True).eval()
    x = torch.randn(2, 4, 6)
    got, want = sp.load(out_file)(x), model(x)
    assert torch.allclose(got[0], want[0], atol=1e-6)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got[1], want[1]))


def test_target_macs_alone_does_not_warn_about_ratio_and_ignore_shows_in_report(tmp_path, capsys):
    from structprune.cli import main

    out = tmp_path / "m.sp"
    rc = main(["prune", "models:get", "--arg", "name=resnet20", "--shape", "1,3,32,32",
               "--target-macs", "0.5", "--ignore", "layer1.0.conv1", "-o", str(out), "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and not d.get("warnings") and d["macs"]["kept"] <= 0.5
    assert any(g["ignored"] for g in d["groups"])
