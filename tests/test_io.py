"""save/load: no pickle, no original code, same outputs; files naming foreign code are refused."""
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

import models
import structprune as sp
from structprune.errors import NothingPrunedWarning
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


def _roundtrip(model, x, path, tol=0.0, **kwargs):
    """Save ``model``, load it back, check the outputs are equal; return the loaded model.

    ``tol``: where the file holds a torch.export capture of a model of the user's class, whose
    ops may round differently from the module's fused kernels.
    """
    sp.save(model, str(path), **kwargs)
    again = sp.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=tol, atol=tol)
    return again


class Recurrent(nn.Module):
    """An MLP, a (two-layer, bidirectional) recurrent layer and a head on its last step."""

    def __init__(self, cell=nn.LSTM, d: int = 6, h: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.rnn = cell(d, h, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * h, 3)

    def forward(self, x):
        y, _ = self.rnn(self.fc2(F.relu(self.fc1(x))))
        return self.head(y[:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_models_save_and_load(tmp_path, cell):
    """Their derived ``_flat_weights`` are stored as references and rebuilt by the class."""
    m = Recurrent(cell).eval()
    x = torch.randn(2, 5, 6)
    pruned = sp.prune(m, x, ratio=0.5)
    assert pruned.get_submodule("fc1").weight.shape[0] < 12
    assert pruned.get_submodule("rnn").hidden_size < 8  # hidden units, every layer/direction
    for i, model in enumerate([m, pruned]):
        again = _roundtrip(model, x, tmp_path / f"r{i}.sp")
        rnn = again.get_submodule("rnn")
        assert type(rnn) is cell
        # The flat weights are the loaded parameters themselves, not copies.
        assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights,
                                                        rnn._flat_weights_names))
        assert len(rnn._flat_weight_refs) == len(rnn._flat_weights) == 16


def test_transformer_encoder_saves_pruned_and_unpruned(tmp_path):
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    m = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    with pytest.warns(NothingPrunedWarning):
        pruned = sp.prune(m, x, ratio=0.5)
    assert isinstance(pruned, fx.GraphModule)
    _roundtrip(pruned, x, tmp_path / "p.sp")
    # torch.fx cannot trace the unpruned encoder: it is captured by torch.export on x.
    _roundtrip(m, x, tmp_path / "m.sp", tol=1e-5, example_inputs=x)


class AutocastNet(nn.Module):
    """Branches on a shape (fx cannot trace it, torch.export can) and runs its head in an
    autocast region, which export captures as a ``wrap_with_autocast`` higher-order op whose
    body is a nested GraphModule."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 4, 3)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * 2
        y = self.conv2(F.relu(self.bn(self.conv1(x))))
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=False):
            return torch.sigmoid(y.float()) * 3


def test_export_captured_autocast_region(tmp_path):
    m = AutocastNet().eval()
    x = torch.randn(2, 3, 8, 8)
    pruned = sp.prune(m, x, ratio=0.5)
    assert pruned.meta.get("structprune_capture") == "export"
    assert pruned.conv1.weight.shape[0] == 4  # pruned, and the autocast region came along
    again = _roundtrip(pruned, x, tmp_path / "p.sp")
    hops = [n for n in again.graph.nodes if n.op == "call_function"
            and n.target is torch.ops.higher_order.wrap_with_autocast]
    assert len(hops) == 1
    body = again.get_submodule(hops[0].args[4].target)
    assert isinstance(body, fx.GraphModule) and any(
        n.target is torch.ops.aten.sigmoid.default for n in body.graph.nodes)
    # The unpruned model needs its example inputs to be captured.
    with pytest.raises(SerializationError, match=r"example_inputs=x.*AutocastNet|AutocastNet.*"
                                                 r"example_inputs=x"):
        sp.save(m, str(tmp_path / "m.sp"))
    _roundtrip(m, x, tmp_path / "m.sp", example_inputs=(x,))


def test_models_pruned_in_place_save(tmp_path):
    """sp.prune_ leaves the user's own class: fx captures it, or export on example inputs."""
    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.conv2(F.relu(self.conv1(x)))

    x = torch.randn(1, 3, 8, 8)
    cnn = sp.prune_(Cnn().eval(), x, ratio=0.5)
    assert type(cnn) is Cnn and cnn.conv1.out_channels == 4
    _roundtrip(cnn, x, tmp_path / "c.sp")
    branchy = sp.prune_(AutocastNet().eval(), x, ratio=0.5)
    assert type(branchy) is AutocastNet and branchy.conv1.weight.shape[0] == 4
    with pytest.raises(SerializationError, match="example_inputs"):
        sp.save(branchy, str(tmp_path / "b.sp"))
    _roundtrip(branchy, x, tmp_path / "b.sp", example_inputs=x)


def test_shared_tensors_and_modules_stay_shared(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(4, 4), nn.Linear(4, 4)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))

    x = torch.randn(2, 4)
    again = _roundtrip(Tied(), x, tmp_path / "t.sp")
    assert again.enc.weight is again.dec.weight
    # One module under two names in a graph.
    m = Tied()
    g = fx.Graph()
    y = g.call_module("enc", (g.placeholder("x"),))
    g.output(g.call_module("again", (y,)))
    gm = fx.GraphModule(m, fx.Graph())  # holder for the two paths
    gm.add_module("enc", m.enc)
    gm.add_module("again", m.enc)
    gm.graph = g
    again = _roundtrip(gm, x, tmp_path / "g.sp")
    assert again.enc is again.get_submodule("again")


def test_unstorable_attribute_message_is_short(tmp_path):
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    m[0].cache = [torch.randn(300, 300)]  # a tensor the model does not own
    with pytest.raises(SerializationError) as info:
        sp.save(m, str(tmp_path / "m.sp"))
    msg = str(info.value)
    assert "module '0' (Linear).cache[0]" in msg and "(300, 300)" in msg
    assert "register_buffer" in msg
    assert len(msg) < 300 and "tensor(" not in msg
    m[0].cache = object()
    with pytest.raises(SerializationError, match=r"module '0' \(Linear\)\.cache: cannot store this "
                                                 r"object \(<object object at"):
        sp.save(m, str(tmp_path / "m.sp"))
