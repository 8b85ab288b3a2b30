"""Regressions for what the review of the Trust work found (each failed before its fix)."""
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import masked_output, max_rel_diff, randomize_


class ReadsAttribute(nn.Module):
    """forward reads a pruned module's attribute: the graph fixed its traced value."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.c1(x))
        return self.c2(h / math.sqrt(self.c1.out_features))


def test_in_place_refuses_a_forward_that_reads_a_pruned_attribute():
    m = ReadsAttribute().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(sp.PlanError, match="own forward traces to another graph"):
        sp.prune_(m, x, ratio=0.5)
    assert m.c1.out_features == 8 and m.c1.weight.shape == (8, 4)
    pruner = sp.Pruner(m, x, ratio=0.5)  # sp.prune returns the graph, which is exact
    plan = pruner.plan()
    p = pruner.apply(plan)
    assert not pruner.applied.own_class
    assert max_rel_diff(p(x), masked_output(pruner.graph, plan)) < 1e-12


class Optional_(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, extra=None):
        h = self.a(x)
        if extra is None:
            h = h * 2
        else:
            h = h + extra
        return self.b(h)


def test_save_keeps_the_branch_of_a_none_default(tmp_path):
    m = Optional_().eval()
    x = torch.randn(3, 4)
    for model in (m, sp.prune(m, x, ratio=0.5)):
        path = os.path.join(tmp_path, "m.sp")
        sp.save(model, path)
        again = sp.load(path)
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        with pytest.raises(AssertionError, match="extra=None"):
            again(x, torch.ones(8))


class DictFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, batch):
        x = batch["x"]
        if x.shape[0] > 1:  # fx cannot trace this: torch.export captures the model
            x = x + 1
        h = F.relu(self.a(x))
        if batch["double"]:
            h = h * 2
        return self.b(h)


def test_a_flag_inside_a_dict_input_is_guarded():
    m = DictFlag()
    x = torch.randn(3, 4)
    p = sp.prune(m, ({"x": x, "double": False},), ratio=0.5)
    p({"x": x, "double": False})
    with pytest.raises(AssertionError, match=r"batch\['double'\]=False"):
        p({"x": x, "double": True})


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def test_in_place_on_export_capture_with_a_partial_optimizer_changes_nothing_on_failure():
    m = Branchy()
    opt = torch.optim.SGD([m.c.weight], lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(sp.PlanError, match="optimizer"):
        sp.prune_(m, torch.randn(3, 4), ratio=0.5, optimizer=opt)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.a.out_features == 8 and m(torch.randn(3, 4)).shape == (3, 2)


class Mode(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, mode: str = "relu"):
        h = self.a(x)
        h = torch.tanh(h) if mode == "tanh" else F.relu(h)
        return self.b(h)


class FailsAtStep2:
    def __init__(self):
        self.calls = 0

    def __call__(self, group, graph):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("scoring failed in step 2")
        return torch.arange(group.num_units, dtype=torch.float64)


def test_a_failed_in_place_prune_leaves_no_guard_hook():
    m = Mode()
    with pytest.raises(RuntimeError, match="step 2"):
        sp.prune_(m, (torch.randn(3, 4), "relu"), ratio=0.5, iterative_steps=2,
                  importance=FailsAtStep2())
    assert not m._forward_pre_hooks and m.a.out_features == 8
    m(torch.randn(3, 4), "tanh")  # still callable with any mode


def test_measuring_the_deviation_leaves_batch_norm_statistics_alone():
    m = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.LayerNorm(16), nn.Linear(16, 32),
                      nn.ReLU(), nn.Linear(32, 3)).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sp.Pruner(m, torch.randn(5, 6), ratio=0.5, prune_normalized_dims=True).run()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_calibration_failure_restores_the_users_gradients():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    own = m[0].weight.grad = torch.ones_like(m[0].weight)
    with pytest.raises(sp.PlanError, match="pair"):
        sp.prune(m, torch.randn(3, 4), importance="taylor", data=[torch.randn(3, 4)],
                 loss_fn=F.cross_entropy)
    assert m[0].weight.grad is own


def test_no_noop_warning_for_what_the_user_left_out():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(64, 256)
            self.small = nn.Sequential(nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x):
            return self.small(F.relu(self.big(x)))

    m = randomize_(Net())
    x = torch.randn(2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.prune(m, x, ratio={m.small: 0.5})
        sp.prune(m, x, ratio=0.5, ignore=[m.big])


def test_keyword_arguments_taken_by_var_kwargs_are_guarded():
    class KwArgs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x, **kw):
            h = self.a(x).relu()
            if kw.get("double"):
                h = h * 2
            return self.b(h)

    x = torch.randn(3, 4)
    p = sp.prune(KwArgs().eval(), {"x": x, "double": True}, ratio=0.5)
    p(x, double=True)
    with pytest.raises(AssertionError, match="double=True"):
        p(x, double=False)


class AuxHead(nn.Module):
    """A GoogLeNet-like auxiliary head that runs only in training mode."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 5))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.stem(x)
        out = self.fc(self.body(h).mean((2, 3)))
        return (out, self.aux(h)) if self.training else out


def test_modules_only_the_other_mode_runs_are_said_and_train_mode_prunes_them():
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    m = randomize_(AuxHead()).double().eval()
    with pytest.warns(sp.StructpruneWarning, match=r"aux run only in training mode.*model\.train"):
        sp.prune(m, x, ratio=0.5)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pruner = sp.Pruner(m, x, ratio=0.5)
    plan = pruner.plan()
    p = pruner.apply(plan)
    assert pruner.applied.own_class and p.aux[0].in_channels == 8  # pruned with the stem
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # stats untouched
    want = masked_output(pruner.graph, plan)  # training mode: batch statistics, aux head
    got = p(x)
    assert isinstance(got, tuple) and max_rel_diff(got, want) < 1e-9
    p.eval()
    assert p(x).shape == (4, 5)


def test_defaulted_parameters_and_var_kwargs_keep_a_valid_signature():
    class HFLike(nn.Module):  # forward(input_ids=None, attention_mask=None, **kwargs)
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x=None, mask=None, **kwargs):
            if x.shape[0] > 1:  # torch.export captures it
                x = x + 1
            h = F.relu(self.a(x))
            if kwargs.get("return_dict") is False:
                return (self.b(h),)
            return {"logits": self.b(h)}

    x = torch.randn(3, 4)
    p = sp.prune(HFLike(), {"x": x, "return_dict": False}, ratio=0.5)
    assert isinstance(p(x=x, return_dict=False), tuple)
    with pytest.raises(AssertionError, match="return_dict=False"):
        p(x=x)  # left out: the original would return a dict


class StdConv(nn.Conv2d):
    """Overrides only ``_conv_forward`` (weight standardisation over the fan-in)."""

    def _conv_forward(self, x, w, b):
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, b)


def test_a_subclass_that_overrides_any_method_does_not_inherit_its_base_rule():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), StdConv(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 10, 10)
    graph = sp.trace(m, x)
    assert not graph.modules.get("2") or "2" not in {
        str(n.target) for n in graph.graph_module.graph.nodes if n.op == "call_module"}
    # traced through: the standardisation's reduction over the fan-in keeps it whole
    assert all(mem.qualname != "2.weight" or mem.dim != 1
               for g in graph.groups() for mem in g.params)
    pruner = sp.Pruner(m, x, ratio=0.5)
    plan = pruner.plan()
    assert not plan.is_empty  # the first conv's channels that only feed ... stay exact
    assert max_rel_diff(pruner.apply(plan)(x), masked_output(pruner.graph, plan)) < 1e-5


def test_hooks_freeze_their_module_or_are_refused_on_the_model():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    m[0].register_forward_hook(lambda mod, i, o: o - o.mean(1, keepdim=True))
    x = torch.randn(2, 3, 6, 6)
    graph = sp.trace(m, x)
    assert not graph.groups() and any("forward hooks" in e.reason for e in graph.frozen())
    root = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    root.register_forward_hook(lambda mod, i, o: o * 2)
    with pytest.raises(sp.ModelError, match="forward hooks on the model itself"):
        sp.prune(root, x)


def test_parametrized_weights_are_refused_with_the_fix():
    from torch.nn.utils.parametrizations import weight_norm

    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), weight_norm(nn.Conv2d(8, 4, 1)))
    with pytest.raises(sp.ModelError, match="remove_parametrizations"):
        sp.prune(m, torch.randn(2, 3, 6, 6))


def test_training_branches_in_inherited_code_are_seen():
    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = F.relu(self.stem(x))
            return (self.head(h), self.aux(h)) if self.training else self.head(h)

    class Child(Base):
        def __init__(self):
            super().__init__()
            self.aux = nn.Conv2d(8, 2, 1)

    with pytest.warns(sp.StructpruneWarning, match="aux run only in training mode"):
        sp.prune(Child().eval(), torch.randn(2, 3, 6, 6))


def test_an_export_captured_model_refuses_other_input_shapes():
    class Baked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            if x.shape[0] > 1:  # fx cannot trace this: torch.export captures it
                x = x * 2
            return self.b(F.relu(self.a(x))).reshape(2, -1)  # export bakes the batch in

    m = Baked()
    x = torch.randn(2, 4)
    p = sp.prune(m, x, ratio=0.5)
    assert p(x).shape == (2, 3)
    with pytest.raises(AssertionError, match=r"captured by torch.export for input 'x' of shape"):
        p(torch.randn(4, 4))  # would reshape 4 rows into 2 without a word
