"""Every tutorial runs top to bottom in its tiny setting (SP_TINY=1) and ends on its assertion."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUTORIALS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "[0-9]*.py")))


def test_there_are_tutorials():
    assert TUTORIALS


@pytest.mark.parametrize("path", TUTORIALS, ids=os.path.basename)
def test_tutorial_runs(path):
    # As a user (or `make demo`) runs it: no PYTHONPATH, so the tutorial finds models/ itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SP_TINY"] = "1"
    out = subprocess.run([sys.executable, path], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "params" in out.stdout and "MACs" in out.stdout
