"""save/load: no pickle, no original code, same outputs; files naming foreign code are refused."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import models
import structprune as sp
from structprune.io import SerializationError
from structprune.testing import randomize_, run


def test_roundtrip_without_the_model_code(tmp_path):
    torch.manual_seed(0)
    m = randomize_(models.get("shufflenetv2", width=0.5)).eval()
    x = models.example_inputs("shufflenetv2")[0]
    pruned = sp.prune(m, x, ratio=0.5)
    path = str(tmp_path / "m.sp")
    sp.save(pruned, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(run(pruned, x), tmp_path / "y.pt")
    code = ("import torch, structprune as sp; m = sp.load('m.sp'); "
            "x = torch.load('x.pt'); y = torch.load('y.pt'); "
            "assert torch.allclose(m(x), y, atol=1e-6), 'outputs differ'; print('OK', type(m).__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK ShuffleNetV2" in out.stdout  # the model keeps its name without its code


def test_unpruned_model_is_traced_and_saved(tmp_path):
    m = models.get("vit").eval()
    x = models.example_inputs("vit")[0]
    sp.save(m, str(tmp_path / "v.sp"))
    again = sp.load(str(tmp_path / "v.sp"))
    torch.testing.assert_close(run(again, x), run(m, x))


def test_refuses_foreign_classes(tmp_path):
    m = models.get("resnet20").eval()
    path = str(tmp_path / "r.sp")
    sp.save(m, path)
    with safe_open(path, framework="pt") as f:
        spec = json.loads(f.metadata()["structprune"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    spec["modules"]["conv1"]["class"] = "os:system"
    bad = str(tmp_path / "bad.sp")
    save_file(tensors, bad, metadata={"structprune": json.dumps(spec)})
    with pytest.raises(SerializationError, match="refusing to import os:system"):
        sp.load(bad)


def test_not_a_structprune_file(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(SerializationError, match="not a structprune file"):
        sp.load(path)
