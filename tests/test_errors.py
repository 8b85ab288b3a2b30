"""Bad input: the error type, a message naming the culprit, and an unchanged input model."""
import copy

import pytest
import torch
import torch.nn as nn

import structprune as sp


def small():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))


X = torch.randn(2, 3, 9, 9)


def unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half", True])
def test_ratio_outside_range(ratio):
    m = small()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(sp.PlanError, match=r"ratio must be a number in \[0, 1\)"):
        sp.prune(m, X, ratio=ratio)
    assert unchanged(m, before)


def test_ignore_entry_not_a_submodule():
    m = small()
    before = copy.deepcopy(m.state_dict())
    stranger = nn.Linear(3, 3)
    with pytest.raises(sp.PlanError, match="ignore entry Linear is not a submodule of Sequential"):
        sp.prune(m, X, ratio=0.5, ignore=[stranger])
    with pytest.raises(sp.PlanError, match="ignore entry 'fc' is not a submodule"):
        sp.prune(m, X, ratio=0.5, ignore=["fc"])
    assert unchanged(m, before)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.inner = Inner()

    def forward(self, x):
        return self.inner(self.conv(x))


class Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_model():
    m = Branchy()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(sp.TraceError) as info:
        sp.prune(m, X, ratio=0.5)
    msg = str(info.value)
    assert "module 'inner'" in msg and "if x.sum() > 0" in msg and "leaf_modules" in msg
    assert unchanged(m, before)
    # The advice works: as a leaf, the block is frozen and reported, the rest still prunes.
    g = sp.trace(m, X, leaf_modules=[Inner])
    assert any("no rule for" in e.reason and e.node == "inner" for e in g.frozen())


def test_wrong_input_shape():
    m = small()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(sp.TraceError, match=r"failed on the example inputs \(shapes \(2, 5, 9, 9\)\) "
                                            r"at node %_0 .*expected input"):
        sp.prune(m, torch.randn(2, 5, 9, 9), ratio=0.5)
    assert unchanged(m, before)


def test_unknown_importance():
    m = small()
    with pytest.raises(sp.PlanError, match="unknown importance 'l3'; choose one of random, l1, l2"):
        sp.prune(m, X, ratio=0.5, importance="l3")


def test_plan_that_empties_a_layer():
    m = small()
    before = copy.deepcopy(m.state_dict())
    pruner = sp.Pruner(m, X)
    g = pruner.graph.groups()[0]
    with pytest.raises(sp.PlanError, match=r"would drop all 8 units of group 0 \(0, 1"):
        sp.Plan(pruner.graph, {g.id: torch.arange(g.num_units)})
    with pytest.raises(sp.PlanError, match="has 8 units"):
        sp.Plan(pruner.graph, {g.id: torch.tensor([8])})
    assert unchanged(m, before)


def test_meta_device_model():
    with torch.device("meta"):
        m = small()
    with pytest.raises(sp.ModelError, match="parameter '0.weight' is on the meta device"):
        sp.prune(m, X, ratio=0.5)


def test_half_precision_model():
    m = small().half()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(sp.ModelError, match=r"parameter '0.weight' is torch.float16.*model.float\(\)"):
        sp.prune(m, X.half(), ratio=0.5)
    assert unchanged(m, before) and m[0].weight.dtype == torch.float16


def test_bad_options():
    m = small()
    with pytest.raises(sp.PlanError, match="target_macs must be in"):
        sp.prune(m, X, target_macs=1.5)
    with pytest.raises(sp.PlanError, match="round_to must be a positive int"):
        sp.prune(m, X, round_to=0)
    with pytest.raises(sp.PlanError, match="iterative_steps must be an int"):
        sp.prune(m, X, iterative_steps=0)


def test_example_inputs_of_wrong_type():
    with pytest.raises(sp.TraceError, match="example_inputs must be a tensor"):
        sp.trace(small(), "not a tensor")


def test_a_model_output_that_pins_channels_is_reported():
    class Pinned(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x)  # the output's channels cannot change

    g = sp.trace(Pinned(), X)
    assert g.groups() == []
    assert [(e.node, e.op) for e in g.frozen()] == [("conv", "output")]
