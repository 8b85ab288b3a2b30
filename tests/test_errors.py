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
    with pytest.raises(sp.TraceError) as info:
        sp.prune(m, torch.randn(2, 5, 9, 9), ratio=0.5)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert ("module '0' (Conv2d) expects [N, 3, *] and got (2, 5, 9, 9) at node %_0, from input "
            "'input' of shape (2, 5, 9, 9)") in msg
    assert "expected input[2, 5, 9, 9] to have 3 channels" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert unchanged(m, before)


def test_wrong_input_shape_names_the_input_that_reaches_the_module():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    with pytest.raises(sp.TraceError) as info:
        sp.trace(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 5)))
    msg = str(info.value)
    assert "module 'b' (Linear) expects [*, 6] and got (2, 5)" in msg
    assert "from input 'y' of shape (2, 5):" in msg and "'x'" not in msg


# A detector-like model that neither torch.fx nor torch.export can capture: data-dependent
# shapes (.nonzero()), a Python loop over a tensor's values, and a branch on a tensor value.
class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.body(x)


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        scores = self.head(self.backbone(x)).flatten(1)
        keep = (scores[0] > 0).nonzero()
        kept = [v for v in scores[0][keep].tolist()]  # noqa: C416 (a loop over tensor values)
        if scores.sum() > 0:
            return scores, len(kept)
        return -scores, len(kept)


def test_failed_capture_is_short_names_the_line_and_suggests_a_submodule(capfd):
    m = Detector()
    with pytest.raises(sp.TraceError) as info:
        sp.trace(m, torch.randn(2, 3, 8, 8))  # sp.prune would prune it in parts
    msg = str(info.value)
    assert len(msg.splitlines()) < 15, msg
    assert "in the top module (Detector)" in msg
    assert f"{__file__}:" in msg and "kept = [v for v in scores[0][keep].tolist()]" in msg
    assert "torch.fx: TraceError:" in msg
    assert "torch.export fallback failed as well: GuardOnDataDependentSymNode" in msg
    assert "model.backbone (1,408 params)" in msg and "STRUCTPRUNE_DEBUG=1" in msg
    # No chained fx/export tracebacks, and nothing torch printed (export dumps partial graphs).
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "def forward" not in capfd.readouterr().err
    # The advice works: the backbone prunes on its own.
    pruned = sp.prune(m.backbone, torch.randn(2, 3, 8, 8), ratio=0.5)
    assert pruned.body[0].out_channels == 4


def test_debug_mode_keeps_the_full_detail(monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_DEBUG", "1")
    with pytest.raises(sp.TraceError) as info:
        sp.trace(Detector(), torch.randn(2, 3, 8, 8))
    msg = str(info.value)
    assert "--- torch.fx ---" in msg and "--- torch.export ---" in msg and "Traceback" in msg
    assert info.value.__cause__ is not None
    with pytest.raises(sp.TraceError) as info:
        sp.trace(small(), torch.randn(2, 5, 9, 9))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_wrong_input_shape_of_a_model_that_does_not_capture():
    with pytest.raises(sp.TraceError) as info:
        sp.trace(Detector(), torch.randn(2, 5, 8, 8))
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert ("Detector does not run on its example inputs: module 'backbone.body.0' (Conv2d) "
            "expects [N, 3, *] and got (2, 5, 8, 8), from input 'x' of shape (2, 5, 8, 8)") in msg


_SITE_MODEL = """\
import torch.nn as nn


class SiteDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))

    def forward(self, x):
        f = self.backbone(x)
        if f.sum() > 0:
            return f
        return -f
"""


def test_failure_in_model_code_under_site_packages_names_its_line():
    # Model code installed next to torch (as torchvision is) is the model's code, not torch's.
    import linecache
    import os

    site = os.path.dirname(os.path.dirname(torch.__file__))
    fname = os.path.join(site, "torchvision", "models", "detection", "sitedet.py")
    linecache.cache[fname] = (len(_SITE_MODEL), None, _SITE_MODEL.splitlines(True), fname)
    ns = {"__name__": "torchvision.models.detection.sitedet"}
    exec(compile(_SITE_MODEL, fname, "exec"), ns)
    try:
        with pytest.raises(sp.TraceError) as info:
            sp.trace(ns["SiteDetector"](), torch.randn(1, 3, 8, 8))
    finally:
        del linecache.cache[fname]
    msg = str(info.value)
    assert f"{fname}:11: if f.sum() > 0:" in msg, msg
    assert "model.backbone" in msg


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


def test_bfloat16_model_is_told_to_convert_back_to_bfloat16():
    m = small().to(torch.bfloat16)
    with pytest.raises(sp.ModelError) as info:
        sp.prune(m, X.to(torch.bfloat16), ratio=0.5)
    msg = str(info.value)
    assert "is torch.bfloat16" in msg and "back with .to(torch.bfloat16)" in msg
    assert ".half()" not in msg


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
