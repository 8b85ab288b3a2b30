"""Hand-built references for the ATen rules (``structprune/ops/aten.py``) and the factory rule.

The ATen overloads are what ``torch.export`` graphs call; here they are called directly from
``forward`` (fx records them as they are), so each rule is exercised in isolation. Every test
prunes named channels with :func:`assert_rule` (all oracle checks), then recomputes the pruned
network by hand from slices of the original tensors and compares. The last test does the same
for a whole model that fx cannot trace, through the ``torch.export`` fallback.
"""
import typing

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.graph.capture import capture
from structprune.model_output import build_output
from structprune.rules import registry
from structprune.testing import assert_rule, randomize_

aten = torch.ops.aten


def f64(m):
    return randomize_(m).double().eval()


def img(c=3, hw=6):
    return torch.randn(2, c, hw, hw, dtype=torch.float64)


def others(n, *drop):
    return torch.tensor([i for i in range(n) if i not in drop])


def node_args(model, target):
    """The args of the (only) node calling ``target`` in a pruned GraphModule."""
    hits = [n.args for n in model.graph.nodes if n.target == target]
    assert len(hits) == 1, hits
    return hits[0]


class Wrap(nn.Module):
    """``pre`` conv (3 -> c), then ``fn(self, h)``, then ``post`` conv (c_out -> 4)."""

    def __init__(self, fn, c=8, c_out=None, **extra):
        super().__init__()
        self.pre = nn.Conv2d(3, c, 3, padding=1)
        self.post = nn.Conv2d(c if c_out is None else c_out, 4, 1)
        for k, v in extra.items():
            setattr(self, k, v)
        self.fn = fn

    def forward(self, x):
        return self.post(self.fn(self, self.pre(x)))


def pre_sliced(m, x, keep):
    return F.conv2d(x, m.pre.weight[keep], m.pre.bias[keep], padding=1)


def post_sliced(m, h, keep_in):
    return F.conv2d(h, m.post.weight[:, keep_in], m.post.bias)


# ------------------------------------------------------------------------------- convolution
def test_aten_convolution_grouped_drops_a_whole_group():
    m = f64(Wrap(lambda s, h: aten.convolution.default(
        h, s.g.weight, s.g.bias, [1, 1], [1, 1], [1, 1], False, [0, 0], 4),
        g=nn.Conv2d(8, 8, 3, padding=1, groups=4)))
    x = img()
    pruned = assert_rule(m, x, drop={"pre": [1]})  # input channel 1 is in group 0 (0, 1)
    k = others(8, 0, 1)
    h = F.conv2d(pre_sliced(m, x, k), m.g.weight[k], m.g.bias[k], padding=1, groups=3)
    torch.testing.assert_close(pruned(x), post_sliced(m, h, k))
    assert node_args(pruned, aten.convolution.default)[8] == 3


def test_aten_convolution_grouped_drops_a_position_in_every_group():
    """2 groups of 4 channels: more units by position (4) than by whole groups (2), so input
    channel 1 goes with channel 5 (position 1 of both groups), the outputs stay and so does
    ``groups``; each group reads one channel less."""
    m = f64(Wrap(lambda s, h: aten.convolution.default(
        h, s.g.weight, s.g.bias, [1, 1], [1, 1], [1, 1], False, [0, 0], 2),
        g=nn.Conv2d(8, 8, 3, padding=1, groups=2)))
    x = img()
    pruned = assert_rule(m, x, drop={"pre": [1]})
    k = others(8, 1, 5)
    h = F.conv2d(pre_sliced(m, x, k), m.g.weight[:, [0, 2, 3]], m.g.bias, padding=1, groups=2)
    torch.testing.assert_close(pruned(x), post_sliced(m, h, torch.arange(8)))
    assert tuple(pruned.g.weight.shape) == (8, 3, 3, 3)  # the literal groups=2 holds


def test_aten_convolution_transposed():
    m = f64(Wrap(lambda s, h: aten.convolution.default(
        h, s.t.weight, s.t.bias, [2, 2], [0, 0], [1, 1], True, [0, 0], 1), c_out=5,
        t=nn.ConvTranspose2d(8, 5, 2, stride=2)))
    x = img()
    graph = sp.trace(m, x)
    conv = next(n.name for n in graph.graph_module.graph.nodes
                if n.target is aten.convolution.default)
    pruned = assert_rule(m, x, drop={"pre": [2, 7], conv: [3]})
    ki, ko = others(8, 2, 7), others(5, 3)
    h = F.conv_transpose2d(pre_sliced(m, x, ki), m.t.weight[ki][:, ko], m.t.bias[ko], stride=2)
    torch.testing.assert_close(pruned(x), post_sliced(m, h, ko))


def test_aten_conv_transpose2d_input():
    m = f64(Wrap(lambda s, h: aten.conv_transpose2d.input(h, s.t.weight, s.t.bias, [1, 1], [1, 1]),
                 c_out=6, t=nn.ConvTranspose2d(8, 6, 3, padding=1)))
    x = img()
    graph = sp.trace(m, x)
    conv = next(n.name for n in graph.graph_module.graph.nodes
                if n.target is aten.conv_transpose2d.input)
    pruned = assert_rule(m, x, drop={"pre": [0], conv: [1, 4]})
    ki, ko = others(8, 0), others(6, 1, 4)
    h = F.conv_transpose2d(pre_sliced(m, x, ki), m.t.weight[ki][:, ko], m.t.bias[ko], padding=1)
    torch.testing.assert_close(pruned(x), post_sliced(m, h, ko))


# ------------------------------------------------------------------------------- batch norms
def test_aten_batch_norm_and_native_batch_norm():
    def fn(s, h):
        b = s.bn
        y = aten.batch_norm.default(h, b.weight, b.bias, b.running_mean, b.running_var, False,
                                    0.1, 1e-5, False)
        z = aten._native_batch_norm_legit_no_training.default(
            h, s.bn2.weight, s.bn2.bias, s.bn2.running_mean, s.bn2.running_var, 0.1, 1e-3)[0]
        return y * z

    m = f64(Wrap(fn, bn=nn.BatchNorm2d(8), bn2=nn.BatchNorm2d(8)))
    x = img()
    pruned = assert_rule(m, x, drop={"pre": [3, 6]})
    k = others(8, 3, 6)
    h = pre_sliced(m, x, k)

    def bn(b, eps):
        return F.batch_norm(h, b.running_mean[k], b.running_var[k], b.weight[k], b.bias[k],
                            False, 0.0, eps)

    torch.testing.assert_close(pruned(x), post_sliced(m, bn(m.bn, 1e-5) * bn(m.bn2, 1e-3), k))


def test_aten_prelu():
    m = f64(Wrap(lambda s, h: aten.prelu.default(h, s.act.weight), act=nn.PReLU(8)))
    x = img()
    pruned = assert_rule(m, x, drop={"pre": [0, 5]})
    k = others(8, 0, 5)
    ref = post_sliced(m, F.prelu(pre_sliced(m, x, k), m.act.weight[k]), k)
    torch.testing.assert_close(pruned(x), ref)


# ---------------------------------------------------------------------- embedding and addmm
class EmbedAddmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.out = nn.Embedding(10, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, ids):
        h = aten.embedding.default(self.emb.weight, ids)
        return self.out(F.relu(aten.addmm.default(self.lin.bias, h.reshape(-1, 8),
                                                  self.lin.weight.t())))


def test_aten_embedding_and_addmm():
    m = f64(EmbedAddmm())
    ids = torch.randint(0, 10, (2, 5))
    graph = sp.trace(m, ids)
    emb = next(n.name for n in graph.graph_module.graph.nodes if n.target is aten.embedding.default)
    mm = next(n.name for n in graph.graph_module.graph.nodes if n.target is aten.addmm.default)
    pruned = assert_rule(m, ids, drop={emb: [2, 7], mm: [4]})
    ke, kl = others(8, 2, 7), others(6, 4)
    h = F.embedding(ids, m.emb.weight[:, ke]).reshape(-1, 6)
    y = F.relu(torch.addmm(m.lin.bias[kl], h, m.lin.weight[kl][:, ke].t()))
    torch.testing.assert_close(pruned(ids), F.linear(y, m.out.weight[:, kl], m.out.bias))


# ------------------------------------------------------------------- slice, narrow, select
@pytest.mark.parametrize("op", ["slice", "narrow"])
def test_aten_slice_and_narrow_shift_their_bounds(op):
    def fn(s, h):  # channels 2..7
        return aten.slice.Tensor(h, 1, 2, 8) if op == "slice" else aten.narrow.default(h, 1, 2, 6)

    m = f64(Wrap(fn, c_out=6))
    x = img()
    pruned = assert_rule(m, x, drop={"pre": [0, 4]})  # 0 is outside the slice, 4 inside
    k = others(8, 0, 4)
    h = pre_sliced(m, x, k)[:, 1:]  # pruned channels 2, 3, 5, 6, 7 sit at 1..5
    torch.testing.assert_close(pruned(x), post_sliced(m, h, torch.tensor([0, 1, 3, 4, 5])))
    target = aten.slice.Tensor if op == "slice" else aten.narrow.default
    args = node_args(pruned, target)
    assert (args[2], args[3]) == ((1, 6) if op == "slice" else (1, 5))


def test_aten_select_keeps_its_channel_and_moves_its_index():
    m = f64(Wrap(lambda s, h: h * aten.select.int(h, 1, 5).unsqueeze(1)))
    x = img()
    pruned = assert_rule(m, x, drop={"pre": [1, 2]})
    k = others(8, 1, 2)
    h = pre_sliced(m, x, k)
    torch.testing.assert_close(pruned(x), post_sliced(m, h * h[:, 3:4], k))  # 5 -> 3
    assert node_args(pruned, aten.select.int)[2] == 3
    with pytest.raises(ValueError):  # the selected channel itself cannot go
        sp.testing.plan_dropping(sp.trace(m, x), {"pre": [5]})


def test_aten_flip_roll_index_select_along_other_dims():
    idx = torch.tensor([5, 4, 3, 2, 1, 0])
    m = f64(Wrap(lambda s, h: aten.flip.default(h, [3]) + aten.roll.default(h, [1], [2])
                 + aten.index_select.default(h, 3, idx)))
    x = img()
    pruned = assert_rule(m, x, drop={"pre": [1, 6]})
    k = others(8, 1, 6)
    h = pre_sliced(m, x, k)
    ref = h.flip(3) + h.roll(1, 2) + h.index_select(3, idx)
    torch.testing.assert_close(pruned(x), post_sliced(m, ref, k))


# --------------------------------------------------------------------------------- factories
@pytest.mark.parametrize("kind", ["new_zeros", "new_ones", "new_full", "aten_zeros", "aten_full"])
def test_factories_follow_the_new_width(kind):
    def fn(s, h):
        b, c, hh, ww = h.shape
        if kind == "new_zeros":
            z = h.new_zeros(b, 8, hh, ww)
        elif kind == "new_ones":
            z = h.new_ones((b, 8, hh, ww))
        elif kind == "new_full":
            z = h.new_full((b, 8, 1, 1), 0.5)
        elif kind == "aten_zeros":
            z = aten.zeros.default([b, 8, hh, ww], dtype=h.dtype)
        else:
            z = aten.full.default([b, 8, 1, 1], 0.25, dtype=h.dtype)
        return h * 2 + z if kind in ("new_zeros", "aten_zeros") else h * z

    m = f64(Wrap(fn))
    x = img()
    pruned = assert_rule(m, x, drop={"pre": [0, 3]})
    k = others(8, 0, 3)
    h = pre_sliced(m, x, k)
    fill = {"new_zeros": None, "aten_zeros": None, "new_ones": 1.0, "new_full": 0.5,
            "aten_full": 0.25}[kind]
    ref = h * 2 if fill is None else h * fill
    torch.testing.assert_close(pruned(x), post_sliced(m, ref, k))
    sizes = [n for n in pruned.graph.nodes if n.op in ("call_method", "call_function")
             and getattr(n.target, "__name__", n.target) in ("new_zeros", "new_ones", "new_full",
                                                             "zeros.default", "full.default")]
    assert sizes and all(8 not in fx.node.map_aggregate(n.args, lambda a: a) for n in sizes)


# ------------------------------------------------------------------ a whole exported model
class ShapeIf(nn.Module):
    """Residual CNN that resizes odd-sized inputs (``if``: fx cannot trace it, export can)."""

    def __init__(self, res=8, mid=6, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, res, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(res)
        self.conv1 = nn.Conv2d(res, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, res, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(res)
        self.fc = nn.Linear(res, classes)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        return self.fc(x.mean((2, 3)))


def test_exported_model_against_a_narrower_twin():
    torch.manual_seed(0)
    m = f64(ShapeIf())
    x = img(hw=7)
    with pytest.raises(Exception):
        fx.symbolic_trace(m)  # really needs the export fallback
    assert capture(m, registry(), example_inputs=((x,), {})).meta["structprune_capture"] == "export"
    graph = sp.trace(m, x)

    def conv_reading(weight):  # the ATen conv node that reads this parameter
        return next(n.name for n in graph.graph_module.graph.nodes if n.op == "call_function"
                    and "conv" in str(n.target) and n.args[1].target == weight)

    stem, conv1 = conv_reading("stem.weight"), conv_reading("conv1.weight")
    kr, km = others(8, 2, 5), others(6, 0)
    pruned = assert_rule(m, x, drop={stem: [2, 5], conv1: [0]})
    twin = ShapeIf(res=6, mid=5).double().eval()
    sd = m.state_dict()
    res_keys = {"stem.weight", "bn0.weight", "bn0.bias", "bn0.running_mean", "bn0.running_var",
                "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var", "conv2.weight"}
    mid_keys = {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"}
    new = {}
    for key, v in sd.items():
        if key in res_keys:
            v = v[kr]
        if key in mid_keys:
            v = v[km]
        if key == "conv1.weight":
            v = v[:, kr]
        if key == "conv2.weight":
            v = v[:, km]
        if key == "fc.weight":
            v = v[:, kr]
        new[key] = v
    twin.load_state_dict(new)
    torch.testing.assert_close(pruned(x), twin(x))


class _Pair(typing.NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class PairOut(nn.Module):
    """fx cannot trace it (a branch on a size); it returns a named tuple, which the exported
    graph rebuilds with ``build_output``; its fields keep their shapes."""

    def __init__(self):
        super().__init__()
        self.pre, self.mid, self.post = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        if x.shape[-1] > 2:
            x = x * 2.0
        h = self.mid(F.relu(self.pre(x)))
        return _Pair(self.post(F.relu(h)), h)


def test_a_named_tuple_output_is_rebuilt_and_its_fields_keep_their_shapes():
    m, x = f64(PairOut()), img()
    pruned = assert_rule(m, x, drop={"conv2d": [1, 6]})  # ONNX and save/load too
    out = pruned(x)
    assert type(out) is _Pair and out.features.shape[1] == 6  # an output: mid stays whole
    k = others(8, 1, 6)
    h = F.conv2d(F.relu(F.conv2d(x * 2.0, m.pre.weight[k], m.pre.bias[k])),
                 m.mid.weight[:, k], m.mid.bias)
    torch.testing.assert_close(out.features, h)
    torch.testing.assert_close(out.logits, F.conv2d(F.relu(h), m.post.weight, m.post.bias))
    assert any(n.target is build_output for n in pruned.graph.nodes)
