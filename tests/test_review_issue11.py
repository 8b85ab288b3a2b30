"""Adversarial review of issue 11's changes: cases that prune silently wrong or crash raw.

Each test states the behaviour structprune promises (exact, or refused/frozen with a reason).
All five failed before their fixes (export guards checked at call time and kept static in ONNX,
multi-dim bool masks, LSTM proj_size, reductions of weights frozen).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.errors import StructpruneError
from structprune.oracle import masked_output, max_rel_diff, run
from structprune.testing import assert_oracle, randomize_


def _exact_or_frozen(model, inputs, others=(), **kw):
    """Prune half of every group: nothing prunable, or exact on the example and on ``others``."""
    torch.manual_seed(0)
    pruner = sp.Pruner(model, inputs, ratio=0.5, **kw)
    plan = pruner.plan()
    if plan.is_empty:
        return None
    pruned = assert_oracle(pruner, plan, tol=1e-8)
    for other in others:
        assert max_rel_diff(run(pruned, other), masked_output(pruner.graph, plan, other)) < 1e-8
    return pruned


def _dropped_units(bias, pruned_bias):
    """Output units of a layer that pruning removed, found by their (distinct) bias values."""
    kept = [next(i for i in range(bias.shape[0]) if bias[i] == b) for b in pruned_bias]
    return [i for i in range(bias.shape[0]) if i not in kept]


def _zeroed_original(model, pruned, names, inputs):
    """The original model's output with the units ``pruned`` removed from modules ``names``
    zeroed at their source (forward hooks on those modules)."""
    params = dict(pruned.named_parameters())
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        drop = _dropped_units(mod.bias.detach(), params[f"{name}.bias"].detach())

        def hook(_m, _i, out, drop=drop):
            out = out.clone()
            out[:, drop] = 0
            return out
        handles.append(mod.register_forward_hook(hook))
    try:
        return run(model, inputs)
    finally:
        for h in handles:
            h.remove()


# --- 1. ops/scatter.py: bool masks under fx capture --------------------------------------------

class Mask2D(nn.Module):
    """``h[mask]`` with a 2-D bool mask over (rows, channels): it consumes both dims."""

    def __init__(self, ellipsis=False):
        super().__init__()
        self.ellipsis = ellipsis
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        if ellipsis:  # h [B, 8, 5]; mask over (8, 5) with 8 True entries: h[..., m] -> [B, 8]
            m = torch.zeros(8, 5, dtype=torch.bool)
            for c in range(8):
                m[c, c % 5] = True
        else:  # h [3, 8, 4]; mask over (3, 8) with 8 True entries: h[m] -> [8, 4]
            m = torch.zeros(3, 8, dtype=torch.bool)
            for c in range(8):
                m[c % 3, c] = True
        self.register_buffer("m", m)

    def forward(self, x):
        h = self.a(x).transpose(1, 2)
        if self.ellipsis:
            return self.b(h[..., self.m])
        return self.b(h[self.m].transpose(0, 1))


@pytest.mark.parametrize("ellipsis", [False, True], ids=["mask", "ellipsis_mask"])
def test_fx_bool_mask_over_two_dims_is_exact_or_frozen(ellipsis):
    model = randomize_(Mask2D(ellipsis)).double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64) if ellipsis else \
        torch.randn(3, 4, 6, dtype=torch.float64)
    _exact_or_frozen(model, (x,))


# --- 2. ops/recurrent.py: whole LSTM with proj_size ----------------------------------------------

class ProjLSTM(nn.Module):
    """A bidirectional ``nn.LSTM(proj_size=4)`` in a model fx cannot trace (shape branch), so
    it is captured by torch.export as ``aten.lstm.input`` with 5 params per direction."""

    def __init__(self, features):
        super().__init__()
        self.inp = nn.Linear(5, features)
        self.rnn = nn.LSTM(features, 8, batch_first=True, bidirectional=True, proj_size=4)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[-1] > 0:  # fx cannot trace this: export capture
            x = self.inp(x)
        y, _ = self.rnn(x)
        return self.out(y)


@pytest.mark.parametrize("features", [8, 6])
def test_export_lstm_with_proj_size_prunes_its_input_exactly(features):
    model = randomize_(ProjLSTM(features)).double().eval()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    pruned = _exact_or_frozen(model, (x,))
    assert pruned is not None  # the input features (inp's outputs) are prunable


# --- 3. graph/export_capture.py + inputs.py: export guards dropped -------------------------------

class ShapeCNN(nn.Module):
    """CNNs fx cannot trace, whose export guards are not plain input sizes: a branch on the
    width (guard ``W <= 4`` for a 4x4 example) and ``int(H * W)`` (guard ``H * W == 16``)."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        if self.style == "branch":
            if x.shape[-1] > 4:
                h = F.max_pool2d(h, 2)
            return self.fc(self.c2(h).mean((2, 3)))
        n = int(x.shape[2] * x.shape[3])
        return self.fc(self.c2(h).flatten(2)[:, :, :n // 2].sum(-1))


@pytest.mark.parametrize("style", ["branch", "int_size"])
def test_export_captured_cnn_on_another_image_size_is_exact_or_refused(style):
    model = randomize_(ShapeCNN(style)).double().eval()
    example = (torch.randn(2, 3, 4, 4, dtype=torch.float64),)
    other = (torch.randn(3, 3, 8, 8, dtype=torch.float64),)
    pruned = sp.prune(model, example, ratio=0.5)
    # on the example's size the helper's reference is the pruned model (checks the helper)
    assert max_rel_diff(run(pruned, example),
                        _zeroed_original(model, pruned, ["c1", "c2"], example)) < 1e-8
    want = _zeroed_original(model, pruned, ["c1", "c2"], other)
    try:
        got = run(pruned, other)
    except (StructpruneError, AssertionError) as exc:  # refused with a message: fine
        assert "captured" in str(exc)
        return
    assert max_rel_diff(got, want) < 1e-8


# --- 4. ops/elementwise.py ReduceRule: a norm/sum of a parameter over a pruned dim --------------

class CosineHead(nn.Module):
    """A cosine classifier (ArcFace/CosFace style): the class weights are normalised over the
    feature dim, which the features' pruning also prunes."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(3, 8))  # w's columns prune with a's outputs

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.how == "norm":
            w = self.w / self.w.norm(dim=1, keepdim=True)
        else:
            w = self.w / self.w.abs().sum(1, keepdim=True)
        return F.linear(h, w)


@pytest.mark.parametrize("how", ["norm", "sum"])
def test_weight_normalised_over_pruned_features_is_exact_or_frozen(how):
    model = randomize_(CosineHead(how)).double().eval()
    x = (torch.randn(4, 6, dtype=torch.float64),)
    pruner = sp.Pruner(model, x, ratio=0.5)
    plan = pruner.plan()
    if plan.is_empty:  # frozen, with a reason: fine
        return
    pruned = pruner.apply(plan)
    assert max_rel_diff(run(pruned, x), _zeroed_original(model, pruned, ["a"], x)) < 1e-8


class PlainHead(CosineHead):
    def forward(self, x):
        return F.linear(torch.relu(self.a(x)), self.w)


def test_plain_head_equals_the_original_with_the_features_zeroed():
    """The reference the test above holds the cosine head to: without the normalisation,
    removing w's columns is exactly zeroing the pruned features (this checks the helper)."""
    model = randomize_(PlainHead("none")).double().eval()
    x = (torch.randn(4, 6, dtype=torch.float64),)
    pruned = sp.prune(model, x, ratio=0.5)
    assert pruned.a.out_features == 4
    assert max_rel_diff(run(pruned, x), _zeroed_original(model, pruned, ["a"], x)) < 1e-8


@pytest.mark.parametrize("style", ["branch", "int_size"])
def test_onnx_of_export_captured_cnn_on_another_image_size_is_exact_or_refused(style, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = randomize_(ShapeCNN(style)).double().eval()
    example = (torch.randn(2, 3, 4, 4, dtype=torch.float64),)
    other = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    pruned = sp.prune(model, example, ratio=0.5)
    path = str(tmp_path / "m.onnx")
    sp.export_onnx(pruned, example, path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    try:
        got = sess.run(None, {sess.get_inputs()[0].name: other.float().numpy()})[0]
    except Exception as exc:  # onnxruntime refuses the size: fine
        assert "dimensions" in str(exc)
        return
    want = _zeroed_original(model, pruned, ["c1", "c2"], (other,))
    assert max_rel_diff(torch.from_numpy(got).double(), want) < 1e-4
