"""MAC counting: every op counts (leaf modules without a rule too), rule formulas agree with
torch's FlopCounterMode, a failing formula is counted anyway and said, and reports state the batch."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models
import structprune as sp
from structprune.errors import StructpruneWarning
from structprune.macs import _measured, count_macs, has_formula
from structprune.ops.linear import LinearRule
from structprune.rules import OpRule
from structprune.plan import Plan
from structprune.plan import count_macs as plan_count_macs


def flop_counter_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """FlopCounterMode's FLOPs / 2 of a forward pass, on meta copies: on the CPU, nn.LSTM and the
    fused TransformerEncoderLayer run as single kernels the counter does not know."""
    meta = copy.deepcopy(model).to("meta").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        meta(*[x.to("meta") for x in inputs])
    return fc.get_total_flops() // 2


class Recurrent(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn = cell(16, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y)


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Linear(64, 10))


@pytest.mark.parametrize("build", [encoder, lambda: Recurrent(nn.LSTM), lambda: Recurrent(nn.GRU)],
                         ids=["transformer_encoder", "lstm", "gru"])
def test_leaf_modules_without_a_rule_count(build):
    m = build().eval()
    x = torch.randn(2, 7, 16 if isinstance(m, Recurrent) else 64)
    ours, ref = count_macs(sp.trace(m, x)), flop_counter_macs(m, x)
    assert ref > 100_000
    assert abs(ours - ref) <= 0.03 * ref, (ours, ref)


def test_lstm_count_is_the_textbook_one():
    m = Recurrent(nn.LSTM).eval()
    b, t = 2, 7
    x = torch.randn(b, t, 16)
    # 4 gates, each an input and a hidden matmul, per step, direction and layer; then the head.
    lstm = sum(2 * 4 * 32 * (i + 32) * b * t for i in (16, 64))
    assert count_macs(sp.trace(m, x)) == lstm + b * t * 64 * 5


def test_cnn_counts_are_unchanged():
    m = models.get("resnet20").eval()
    x = models.example_inputs("resnet20")[0]
    assert x.shape[0] == 2
    assert count_macs(sp.trace(m, x)) == 82_027_776  # README: 82.03M, batch 2
    assert count_macs(sp.trace(m, x[:1])) == 41_013_888  # the CLI's batch 1
    assert plan_count_macs is count_macs  # still importable from structprune.plan


class Mixed(nn.Module):
    """Prunable convs feeding a fixed nn.LSTM (which holds about a third of the MACs)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(8, 64, 3, padding=1)
        self.c2 = nn.Conv1d(64, 64, 1)
        self.c3 = nn.Conv1d(64, 16, 3, padding=1)
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c3(F.relu(self.c2(F.relu(self.c1(x)))))
        out, _ = self.lstm(y.transpose(1, 2))
        return self.head(out[:, -1])


def test_target_macs_counts_a_frozen_lstm():
    m = Mixed().eval()
    x = torch.randn(2, 8, 40)
    base = flop_counter_macs(m, x)
    lstm = flop_counter_macs(m.lstm, torch.randn(2, 40, 16))
    assert 0.2 < lstm / base < 0.5
    pruned = sp.prune(m, x, target_macs=0.6)
    kept = flop_counter_macs(pruned, x) / base
    assert 0.5 < kept <= 0.6, kept


def test_plan_sizes_predict_the_pruned_count():
    m = Mixed().eval()
    x = torch.randn(2, 8, 40)
    p = sp.Pruner(m, x, ratio=0.5)
    plan = p.plan()
    predicted = count_macs(p.graph, plan.new_sizes())
    assert predicted == count_macs(sp.trace(p.apply(plan), x)) < count_macs(p.graph)


class Ops(nn.Module):
    """Conv (grouped, strided, transposed), linear, matmul, bmm, einsum, SDPA and MHA."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 12, 3, stride=2, padding=1)
        self.gconv = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.tconv = nn.ConvTranspose2d(12, 8, 2, stride=2)
        self.w = nn.Parameter(torch.randn(6, 8))
        self.fc = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tconv(self.gconv(self.conv(x)))  # (B, 8, 8, 8)
        y = F.conv2d(y, self.w.view(6, 8, 1, 1)).flatten(2).transpose(1, 2)  # (B, 64, 6)
        y = F.linear(y, self.w.t())  # (B, 64, 8)
        z = self.fc(y)  # (B, 64, 16)
        a = torch.matmul(z, z.transpose(1, 2)) @ z
        a = torch.bmm(a, z.transpose(1, 2))  # (B, 64, 64)
        b = torch.einsum("bij,bjk->bik", a, z)
        q = b.view(b.shape[0], 64, 4, 4).transpose(1, 2)
        s = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b.shape[0], 64, 16)
        out, _ = self.mha(s, s, s)
        return out


def test_rule_formulas_agree_with_the_flop_counter():
    m = Ops().eval()
    x = torch.randn(2, 4, 8, 8)
    g = sp.trace(m, x)
    total, per_node = count_macs(g, per_node=True)
    measured = _measured(g)
    checked = set()
    for n in g.graph_module.graph.nodes:
        rule = g.node_rules.get(n.name)
        if rule is None or not has_formula(rule):
            continue
        ref = measured._count(n, None)
        if ref:  # norms count one MAC per element; the counter counts them as 0
            assert per_node.get(n.name, 0) == ref, (n.name, type(rule).__name__)
            checked.add(type(rule).__name__)
    assert len(checked) >= 8, checked
    assert total == flop_counter_macs(m, x)


class _NoFormulaLinear(LinearRule):
    macs = OpRule.macs  # couples like nn.Linear but has no formula: the counter counts it


class _BrokenLinear(LinearRule):
    def macs(self, mctx):
        raise RuntimeError("broken formula")


def test_a_rule_without_a_formula_is_measured_at_the_plan_sizes():
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(3, 8)
    g, g_meas = sp.trace(m, x), sp.trace(m, x, rules={nn.Linear: _NoFormulaLinear()})
    assert not has_formula(g_meas.node_rules["_0"])
    drops = {0: torch.arange(20)}
    want = count_macs(g, Plan(g, drops).new_sizes())
    assert count_macs(g_meas) == count_macs(g) == 3 * (8 * 32 + 32 * 4)
    assert count_macs(g_meas, Plan(g_meas, drops).new_sizes()) == want == 3 * (8 * 12 + 12 * 4)


def test_a_failing_formula_is_counted_and_said():
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(3, 8)
    g = sp.trace(m, x, rules={nn.Linear: _BrokenLinear()})
    with pytest.warns(StructpruneWarning, match="_BrokenLinear.macs failed on node") as said:
        assert count_macs(g) == 3 * (8 * 32 + 32 * 4)
    assert ["'_0'" in str(w.message) for w in said] == [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_macs(g) == 3 * (8 * 32 + 32 * 4)  # said once per graph and node


def test_report_states_the_batch():
    m = models.get("resnet20").eval()
    x = models.example_inputs("resnet20")[0]
    rep, rep1 = sp.report(m, None, x), sp.report(m, None, x[:1])
    assert rep.input_shapes == [(2, 3, 32, 32)] and rep1.input_shapes == [(1, 3, 32, 32)]
    assert rep.macs_before == 2 * rep1.macs_before
    assert "one forward pass on the example batch as given, inputs (2, 3, 32, 32)" in str(rep)
    d = rep.to_dict()["macs"]
    assert d["input_shapes"] == [[2, 3, 32, 32]] and d["per"].startswith("forward pass")


class DataDependent(nn.Module):
    """The meta device cannot run masked_select (its size depends on values): the graph is run
    for real, where the CPU's fused LSTM kernel hides its matmuls from the counter."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return self.fc(torch.masked_select(y, y > -100.0).view(2, -1, 8))


def test_a_graph_the_meta_device_cannot_run_still_counts_its_leaves():
    m = DataDependent().eval()
    x = torch.randn(2, 5, 4)
    with pytest.raises(NotImplementedError):
        m.to("meta")(x.to("meta"))
    m = DataDependent().eval()
    total, per_node = count_macs(sp.trace(m, x), per_node=True)
    assert per_node == {"rnn_forward": 4 * 8 * (4 + 8) * 2 * 5, "fc": 2 * 5 * 8 * 3}
