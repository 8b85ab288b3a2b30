"""Every tutorial runs top to bottom in its tiny setting (SP_TINY=1) and ends on its assertion;
the plots a tutorial promises are written to its output folder (SP_OUT) and are real images."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUTORIALS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "[0-9]*.py")))
# tutorial -> the PNG files it writes into SP_OUT
PLOTS = {
    "02_prune_gnn_onnx.py": ["gnn_pruning_ratio.png"],
    "03_graph_lottery_tickets.py": ["graph_lottery_tickets.png"],
}


def test_there_are_tutorials():
    assert TUTORIALS
    assert set(PLOTS) <= {os.path.basename(p) for p in TUTORIALS}


def check_plot(path):
    """A readable figure: a PNG of reasonable size with more than a blank background in it."""
    import matplotlib.image

    assert os.path.isfile(path), f"no plot {path}"
    assert os.path.getsize(path) > 10_000, f"{path}: {os.path.getsize(path)} bytes, too small for a plot"
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    img = matplotlib.image.imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 400, img.shape
    rgb = img[..., :3].reshape(-1, 3)
    ink = (rgb.mean(axis=1) < 0.9).mean()  # fraction of pixels that are not (near) white
    colours = len({tuple(p) for p in (rgb[:: max(1, len(rgb) // 20000)] * 255).astype(int).tolist()})
    assert 0.005 < ink < 0.5 and colours > 20, f"{path}: ink {ink:.3f}, {colours} colours"


@pytest.mark.parametrize("path", TUTORIALS, ids=os.path.basename)
def test_tutorial_runs(path, tmp_path):
    # As a user (or `make demo`) runs it: no PYTHONPATH, so the tutorial finds models/ itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SP_TINY"] = "1"
    env["SP_OUT"] = str(tmp_path)
    out = subprocess.run([sys.executable, path], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "params" in out.stdout and "MACs" in out.stdout
    for name in PLOTS.get(os.path.basename(path), []):
        check_plot(os.path.join(tmp_path, name))
