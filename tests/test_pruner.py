"""Allocation modes, schedules, in-place pruning and importances through the public API."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import structprune as sp
from structprune.allocate import keep_count
from structprune.plan import count_macs
from structprune.testing import assert_oracle, randomize_, run


def resnet():
    torch.manual_seed(0)
    m = randomize_(models.get("resnet20")).double().eval()
    return m, models.example_inputs("resnet20")[0].double()


def kept_per_group(pruner, plan):
    return {g.id: g.num_units - len(plan.drops.get(g.id, [])) for g in pruner.graph.groups()}


def test_uniform_drops_the_same_fraction_everywhere():
    m, x = resnet()
    p = sp.Pruner(m, x, ratio=0.5)
    plan = p.plan()
    for g in p.graph.groups():
        assert len(plan.drops[g.id]) == g.num_units // 2


def test_global_ranking_is_uneven_and_capped():
    m, x = resnet()
    p = sp.Pruner(m, x, ratio=0.5, global_=True, max_ratio=0.75)
    plan = p.plan()
    total = sum(g.num_units for g in p.graph.groups())
    assert plan.num_dropped() == total // 2
    fractions = {g.id: len(plan.drops.get(g.id, [])) / g.num_units for g in p.graph.groups()}
    assert max(fractions.values()) <= 0.75 and len(set(fractions.values())) > 1
    assert_oracle(p, plan)


def test_target_macs_reaches_the_budget():
    m, x = resnet()
    pruned = sp.prune(m, x, target_macs=0.4)
    kept = count_macs(sp.trace(pruned, x)) / count_macs(sp.trace(m, x))
    assert 0.3 <= kept <= 0.4


def test_target_macs_out_of_reach_is_explained():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 64, 3))  # last conv feeds output
    with pytest.raises(sp.PlanError, match="target_macs=0.01 is out of reach"):
        sp.prune(m, torch.randn(1, 3, 8, 8), target_macs=0.01)


def test_round_to_keeps_multiples():
    m, x = resnet()
    pruned = sp.prune(m, x, ratio=0.3, round_to=4)
    for name, mod in pruned.named_modules():
        if isinstance(mod, nn.Conv2d):
            assert mod.out_channels % 4 == 0, (name, mod.out_channels)
    assert keep_count(10, 0.35, 4, 1, 1.0) == 8 and keep_count(3, 0.9, 4, 1, 1.0) == 1
    assert keep_count(12, 0.5, 8, 2, 1.0) == 8  # width-2 units: 8 units = 16 channels


def test_iterative_steps_rescore_and_reach_the_ratio():
    m, x = resnet()
    pruner = sp.Pruner(m, x, ratio=0.5, iterative_steps=3)
    widths = []
    for _ in range(3):
        out = pruner.step()
        widths.append(out.get_submodule("conv1").out_channels)
    assert widths == [14, 11, 8]  # 16 * (1 - 0.5 * k / 3), rounded like one-shot pruning
    with pytest.raises(sp.PlanError, match="all 3 steps are done"):
        pruner.step()
    assert run(out, x).shape == (2, 10)


def test_prune_in_place_when_the_forward_allows_it():
    m, x = resnet()
    ref = sp.prune(m, x, ratio=0.5)
    same = sp.prune_(m, x, ratio=0.5)
    assert same is m and type(m).__name__ == "CifarResNet"
    assert m.conv1.out_channels == 8 and m.layer3[0].conv1.out_channels == 32
    torch.testing.assert_close(run(m, x), run(ref, x))


class LiteralView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 36, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 8 * 36))


def test_prune_in_place_refuses_literal_sizes():
    m = LiteralView()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(sp.PlanError, match="cannot be pruned in place"):
        sp.prune_(m, x, ratio=0.5)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    pruned = sp.prune(m, x, ratio=0.5)  # the rewritten graph carries the new literal
    assert "view(-1, 144)" in pruned.code and run(pruned, x).shape == (2, 2)


def test_ignore_keeps_a_module_output():
    m, x = resnet()
    pruned = sp.prune(m, x, ratio=0.5, ignore=[m.layer1[0].conv1])
    assert pruned.get_submodule("layer1.0.conv1").out_channels == 16
    assert pruned.get_submodule("layer1.1.conv1").out_channels == 8


def two_layer():
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.arange(24, dtype=torch.float64).view(6, 4) - 11.5)
        m[0].bias.zero_()
        m[1].weight.copy_(torch.tensor([5.0, -0.1, 3.0, 0.2, -4.0, 1.0]))
        m[3].weight.fill_(1.0)
    return m, torch.randn(8, 4, dtype=torch.float64)


@pytest.mark.parametrize("name", ["l1", "l2", "random", "bn_scale", "fpgm", "lamp", "taylor", "hessian"])
def test_every_importance_name_prunes_correctly(name):
    m, x = resnet()
    if name in ("taylor", "hessian"):
        F.cross_entropy(m(x), torch.tensor([1, 2])).backward()
    pruner = sp.Pruner(m, x, ratio=0.5, importance=name)
    assert_oracle(pruner)


def test_bn_scale_drops_the_smallest_gammas():
    m, x = two_layer()
    plan = sp.Pruner(m, x, ratio=0.5, importance="bn_scale").plan()
    assert plan.drops[0].tolist() == [1, 3, 5]  # |gamma| = 0.1, 0.2, 1.0


def test_l1_scores_by_hand():
    m, x = two_layer()
    imp = sp.importance.MagnitudeImportance(p=1, reduction="sum", normalizer=None, roles=("out",))
    g = sp.trace(m, x).groups()[0]
    want = m[0].weight.abs().sum(1)  # rows of the first linear (bias is zero)
    torch.testing.assert_close(imp(g, sp.trace(m, x)), want)


def test_taylor_without_gradients_is_an_error():
    m, x = resnet()
    with pytest.raises(sp.PlanError, match="taylor importance needs gradients.*loss.backward"):
        sp.Pruner(m, x, importance="taylor").plan()


def test_lamp_normalisation():
    from structprune.importance.base import normalize

    s = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(normalize(s, "lamp"), torch.tensor([1.0, 0.1, 3 / 7, 2 / 9],
                                                                  dtype=torch.float64))


def test_to_networkx_and_repr():
    m, x = resnet()
    g = sp.trace(m, x)
    nxg = g.to_networkx()
    assert nxg.number_of_nodes() == len(g.graph_module.graph.nodes)
    assert nxg.nodes["conv1"]["rule"] == "ConvRule" and nxg.nodes["conv1"]["groups"] == [0]
    assert nxg.has_edge("conv1", "bn1")
    assert "Group 0: 16 units x 1" in repr(g.groups()[0])


def test_report_dict_and_table():
    m, x = resnet()
    pruned = sp.prune(m, x, ratio=0.5)
    rep = sp.report(m, pruned, x)
    d = rep.to_dict()
    assert d["params"]["after"] == sum(p.numel() for p in pruned.parameters())
    assert d["groups"][0]["units_before"] == 16 and d["groups"][0]["units_after"] == 8
    assert 0.2 < d["macs"]["kept"] < 0.3 and "MACs" in str(rep)


def test_activation_masks_contract():
    m, x = resnet()
    pruner = sp.Pruner(m, x, ratio=0.5)
    masks = pruner.plan().activation_masks()
    names = {n.name for n in sp.trace(m, x).graph_module.graph.nodes}
    assert set(masks) <= names and masks["conv1"][0] == 1 and len(masks["conv1"][1]) == 8


def test_pruned_model_is_a_plain_graph_module_where_literals_change():
    """Analysis graphs generate their code lazily; where sp.prune returns a graph (a literal
    had to change) it is an ordinary GraphModule (TorchScript refuses lazy ones)."""
    import torch.fx as fx

    m, x = resnet()
    graph = sp.trace(m, x)
    torch.testing.assert_close(graph.graph_module(x), m(x))  # lazy code still runs
    assert "def forward" in graph.graph_module.code
    lit = LiteralView().double()
    xl = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pruner = sp.Pruner(lit, xl, ratio=0.5)
    pruned = pruner.run()
    assert type(pruned).__mro__[1] is fx.GraphModule and type(pruned).__name__ == "LiteralView"
    assert not pruner.applied.own_class and "literal size" in pruner.applied.reason
    torch.testing.assert_close(torch.jit.script(pruned)(xl), pruned(xl))
    torch.testing.assert_close(copy.deepcopy(pruned)(xl), pruned(xl))


def test_pruned_model_is_of_the_users_class_when_its_forward_runs():
    """Custom methods, attributes, containers and isinstance survive sp.prune (item 6)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3), nn.ReLU())
            self.head = nn.Linear(8, 5)
            self.num_classes = 5

        def embed(self, x):
            return self.features(x).mean((2, 3))

        def forward(self, x):
            return self.head(self.embed(x))

    m = randomize_(Net()).double().eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    pruner = sp.Pruner(m, x, ratio=0.5)
    plan = pruner.plan()
    p = pruner.apply(plan)
    assert isinstance(p, Net) and pruner.applied.own_class and "own forward" in pruner.applied.reason
    assert p.num_classes == 5 and p.features[0].out_channels == 4
    assert p.embed(x).shape == (2, 4) and p.features(x).shape[1] == 4
    from structprune.testing import masked_output, max_rel_diff
    assert max_rel_diff(p(x), masked_output(pruner.graph, plan)) < 1e-9
    assert m.features[0].out_channels == 8  # the input is untouched
    assert isinstance(sp.prune(m, x, ratio=0.0), Net)


@pytest.mark.parametrize("name", ["l2", "bn_scale", "taylor"])
def test_scores_follow_in_place_changes_of_weights_and_grads(name):
    """Per-index values are memoised within one scoring pass only; changing a weight (or its
    gradient) between passes, as an optimizer step does, must change the scores."""
    m, x = resnet()
    pruner = sp.Pruner(m, x, ratio=0.5, importance=name)
    if name == "taylor":
        pruner.model(x).square().sum().backward()
    first = pruner.scores()
    assert pruner.scores().keys() == first.keys()
    with torch.no_grad():
        for k, p in enumerate(m.parameters()):
            if k % 2:  # writes through .data do not bump version counters
                p.data.mul_(torch.rand_like(p) + 0.5)
            else:
                p.mul_(torch.rand_like(p) + 0.5)
        if name == "taylor":
            for p in m.parameters():
                p.grad = p.grad * (torch.rand_like(p) + 0.5)  # new gradient tensors
    fresh = sp.Pruner(m, x, ratio=0.5, importance=name).scores() if name != "taylor" else None
    again = pruner.scores()
    changed = [g for g in first if not torch.allclose(first[g], again[g])]
    assert changed, "scores did not follow the new weights"
    if fresh is not None:  # and they equal what a new graph computes
        for g in fresh:
            torch.testing.assert_close(again[g], fresh[g])


def test_a_tensor_dim_shared_by_many_groups_is_scored_once():
    torch.manual_seed(0)
    m = models.get("densenet").eval()
    x = models.example_inputs("densenet")
    pruner = sp.Pruner(m, x, ratio=0.5)
    graph = pruner.graph
    calls = []
    real = sp.importance.base.lp_per_index

    def count(t, dim, p):
        calls.append((id(t), dim))
        return real(t, dim, p)

    import structprune.importance.magnitude as mag
    mag.lp_per_index, saved = count, mag.lp_per_index
    try:
        pruner.scores()
    finally:
        mag.lp_per_index = saved
    members = [(mm.qualname, mm.dim) for g in graph.groups() for mm in g.params
               if mm.role != "stat"]
    assert len(calls) == len(set(calls)) == len(set(members)) < len(members)
