"""Norm rules honour their modes: a dim that a statistic reduces over stays whole.

Batch norm in training mode, without running statistics, or called with ``training=True``
(timm's ``ScaledStdConv2d`` standardises its weight that way) reduces over every dim but the
channel; instance norm over the spatial dims; group norm over each group and the spatial dims.
Each model here makes such a dim prunable by a Linear in front of the norm, so a rule that let it
go would fail the masked oracle.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.rules import Space
from structprune.pruner import Pruner
from structprune.testing import masked_output, max_rel_diff, randomize_, run

aten = torch.ops.aten


def _oracle(model, x, ratio=0.5):
    """Prune ``ratio`` of every group by l2 and return (masked-oracle deviation, plan)."""
    pruner = Pruner(model, x, ratio=ratio)
    plan = pruner.plan()
    assert not plan.is_empty, f"nothing prunable; frozen: {pruner.graph.frozen()}"
    d = max_rel_diff(run(pruner.apply(plan), x), masked_output(plan.graph, plan))
    return d, plan


class ScaledStdConv2d(nn.Conv2d):
    """A replica of timm's ``ScaledStdConv2d`` (used by ``nf_seresnet26``): the weight is
    standardised over its fan-in by ``F.batch_norm(..., training=True)`` on every call."""

    def __init__(self, cin, cout, k, eps=1e-6):
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.full((cout, 1, 1, 1), 1.0) + 0.3 * torch.randn(cout, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).reshape(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_scaled_std_conv_keeps_its_fan_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), ScaledStdConv2d(8, 6, 3), nn.ReLU(),
                          nn.Conv2d(6, 2, 1)).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    d, plan = _oracle(model, x)
    assert d < 1e-10, f"pruned ScaledStdConv2d differs from the masked original by {d:.3e}"
    # Its input channels are the standardised fan-in: they stay, its output channels go.
    dropped = plan.dropped_indices()
    assert not len(dropped.get(Space.param("2.weight", 1), ()))
    assert len(dropped.get(Space.param("2.weight", 0), ())) == 3
    assert sp.trace(model, x).is_frozen(Space.param("0.weight", 0))


class TokensThenNorm(nn.Module):
    """[N, C, L] -> 1x1 conv (C prunable) -> Linear over L (L prunable) -> norm -> a channel
    mix by einsum (a conv would freeze L) -> Linear over L."""

    def __init__(self, norm, c=4, length=6):
        super().__init__()
        self.mix, self.pre, self.norm = nn.Conv1d(c, c, 1), nn.Linear(length, length), norm
        self.unmix, self.post = nn.Parameter(torch.randn(c, c)), nn.Linear(length, 3)

    def forward(self, x):
        h = self.norm(self.pre(self.mix(x)))
        return self.post(torch.einsum("ncl,dc->ndl", h, self.unmix))


@pytest.mark.parametrize("make, train, spatial_free", [
    (lambda: nn.BatchNorm1d(4), True, False),
    (lambda: nn.BatchNorm1d(4), False, True),
    (lambda: nn.BatchNorm1d(4, track_running_stats=False), False, False),
    (lambda: nn.InstanceNorm1d(4, affine=True), False, False),
    (lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True), False, True),
    (lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True), True, False),
    (lambda: nn.GroupNorm(2, 4), False, False),
])
def test_norm_module_modes(make, train, spatial_free):
    torch.manual_seed(0)
    model = randomize_(TokensThenNorm(make())).double().train(train)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    graph = sp.trace(model, x)
    assert graph.is_frozen(Space.param("pre.weight", 0)) != spatial_free
    d, _ = _oracle(model, x)
    assert d < 1e-10
    assert model.training == train


@pytest.mark.parametrize("call, spatial_free", [
    (lambda s, h: F.batch_norm(h, s.bn.running_mean, s.bn.running_var, s.bn.weight, s.bn.bias), True),
    (lambda s, h: F.batch_norm(h, s.bn.running_mean, s.bn.running_var, s.bn.weight, s.bn.bias,
                               training=True), False),
    (lambda s, h: F.batch_norm(h, None, None, s.bn.weight, s.bn.bias, True), False),
    (lambda s, h: F.instance_norm(h, weight=s.bn.weight, bias=s.bn.bias), False),
    (lambda s, h: F.instance_norm(h, s.bn.running_mean, s.bn.running_var, use_input_stats=False), True),
    (lambda s, h: F.group_norm(h, 2, s.bn.weight, s.bn.bias), False),
    (lambda s, h: aten.batch_norm.default(h, s.bn.weight, s.bn.bias, s.bn.running_mean,
                                          s.bn.running_var, True, 0.1, 1e-5, False), False),
    (lambda s, h: aten.batch_norm.default(h, s.bn.weight, s.bn.bias, s.bn.running_mean,
                                          s.bn.running_var, False, 0.1, 1e-5, False), True),
    (lambda s, h: aten.instance_norm.default(h, s.bn.weight, s.bn.bias, None, None, True, 0.1,
                                             1e-5, False), False),
    (lambda s, h: aten._native_batch_norm_legit.default(
        h, s.bn.weight, s.bn.bias, s.bn.running_mean.clone(), s.bn.running_var.clone(), True, 0.1,
        1e-5)[0], False),
    (lambda s, h: aten._native_batch_norm_legit.no_stats(h, s.bn.weight, s.bn.bias, True, 0.1,
                                                         1e-5)[0], False),
    (lambda s, h: aten._native_batch_norm_legit_no_training.default(
        h, s.bn.weight, s.bn.bias, s.bn.running_mean, s.bn.running_var, 0.1, 1e-5)[0], True),
])
def test_functional_norm_modes(call, spatial_free):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.pre, self.bn = nn.Conv1d(4, 4, 1), nn.Linear(6, 6), nn.BatchNorm1d(4)
            self.unmix, self.post = nn.Parameter(torch.randn(4, 4)), nn.Linear(6, 3)

        def forward(self, x):
            h = call(self, self.pre(self.mix(x)))
            return self.post(torch.einsum("ncl,dc->ndl", h, self.unmix))

    torch.manual_seed(0)
    model = randomize_(M()).double().eval()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    assert sp.trace(model, x).is_frozen(Space.param("pre.weight", 0)) != spatial_free
    d, _ = _oracle(model, x)
    assert d < 1e-10
