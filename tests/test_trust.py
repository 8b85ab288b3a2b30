"""No silent no-op, no ignored argument (issue 10, items 3, 8 and 11)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import masked_output, max_rel_diff, randomize_


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil, self.head = nn.Bilinear(16, 16, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.bil(x, x))


@pytest.mark.parametrize("make, x, culprit", [
    (BilinearNet, torch.randn(2, 16), "Bilinear"),
], ids=["bilinear"])
def test_a_prune_that_removes_nothing_says_so_naming_the_frozen_part(make, x, culprit):
    m = make().eval()
    with pytest.warns(sp.NothingPrunedWarning, match="removed nothing") as rec:
        p = sp.prune(m, x, ratio=0.5)
    msg = str(rec[0].message)
    assert f"no rule for torch.nn.modules" in msg and culprit in msg and "parameters" in msg
    assert sum(q.numel() for q in p.parameters()) == sum(q.numel() for q in m.parameters())


def test_a_prune_that_removes_far_less_than_asked_says_so():
    class MostlyFrozen(nn.Module):  # a big LSTM and a small prunable MLP beside it
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(64, 64, batch_first=True)
            self.a, self.b = nn.Linear(64, 8), nn.Linear(8, 64)

        def forward(self, x):
            return self.rnn(x)[0] + self.b(F.relu(self.a(x)))

    m = MostlyFrozen().eval()
    with pytest.warns(sp.NothingPrunedWarning, match=r"removed only \d+\.\d% of the parameters"):
        sp.prune(m, torch.randn(2, 3, 64), ratio=0.5)
    with pytest.warns(sp.NothingPrunedWarning, match="removed only"):
        sp.prune_(MostlyFrozen().eval(), torch.randn(2, 3, 64), ratio=0.5)


def test_no_warning_when_nothing_was_asked_or_enough_was_removed():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.prune(m, x, ratio=0.0)
        sp.prune(m, x, ratio=0.5)


def test_ratio_and_target_macs_together_warn_that_ratio_is_ignored():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    x = torch.randn(1, 3, 12, 12)
    with pytest.warns(sp.StructpruneWarning, match="ratio is ignored"):
        sp.prune(m, x, ratio=0.3, target_macs=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.prune(m, x, target_macs=0.6)


# --- item 8: gradient importances compute their own gradients -----------------------------------
def _classifier():
    torch.manual_seed(0)
    m = randomize_(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(16, 4))).double()
    data = [(torch.randn(8, 3, 10, 10, dtype=torch.float64), torch.randint(0, 4, (8,)))
            for _ in range(3)]
    return m, data


@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_gradient_importance_with_calibration_data_iteratively(importance):
    m, data = _classifier()
    x = data[0][0]
    own = m[0].weight.grad = torch.full_like(m[0].weight, 7.0)  # the user's own gradient
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pruner = sp.Pruner(m, x, ratio=0.5, importance=importance, iterative_steps=3,
                       data=data, loss_fn=F.cross_entropy)
    p = pruner.run()
    assert p[0].out_channels == 8 and all(q.grad is None for q in p.parameters())
    assert m[0].weight.grad is own and torch.equal(own, torch.full_like(own, 7.0))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BN stats too


def test_taylor_with_data_scores_by_those_gradients():
    m, data = _classifier()
    x = data[0][0]
    pruner = sp.Pruner(m, x, ratio=0.5, importance="taylor", data=data, loss_fn=F.cross_entropy)
    got = pruner.scores()
    m.zero_grad()
    m.eval()
    for xb, yb in data:
        F.cross_entropy(m(xb), yb).backward()
    for q in m.parameters():
        q.grad /= len(data)
    ref = sp.Pruner(m, x, ratio=0.5, importance="taylor").scores()
    assert got.keys() == ref.keys() and all(torch.allclose(got[k], ref[k]) for k in got)


def test_gradient_importance_without_gradients_explains_how_to_give_them():
    m, data = _classifier()
    with pytest.raises(sp.PlanError, match="data= and loss_fn="):
        sp.prune(m, data[0][0], importance="taylor", iterative_steps=5)
    with pytest.raises(sp.PlanError, match="loss_fn"):
        sp.prune(m, data[0][0], importance="taylor", data=data)


# --- item 11: per-module ratios ----------------------------------------------------------------
class Stages(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@pytest.mark.parametrize("steps", [1, 2])
def test_per_module_ratios_most_specific_module_wins(steps):
    m = randomize_(Stages()).double()
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    p = sp.prune(m, x, ratio={m: 0.25, m.body: 0.75, m.body[2]: 0.5}, iterative_steps=steps)
    assert p.stem[0].out_channels == 12  # 0.25 from the model
    assert p.body[0].out_channels == 4  # 0.75 from body
    assert p.body[2].out_channels == 8  # 0.5 from body[2] itself
    only = sp.prune(m, x, ratio={m.body[0]: 0.5})  # groups under no listed module stay
    assert (only.stem[0].out_channels, only.body[0].out_channels,
            only.body[2].out_channels) == (16, 8, 16)
    pruner = sp.Pruner(m, x, ratio={m: 0.25, m.body: 0.75})
    plan = pruner.plan()
    assert max_rel_diff(pruner.apply(plan)(x), masked_output(pruner.graph, plan)) < 1e-9


def test_per_module_ratio_errors_name_the_problem():
    m = Stages()
    x = torch.randn(1, 3, 12, 12)
    with pytest.raises(sp.PlanError, match="not a submodule"):
        sp.prune(m, x, ratio={nn.Linear(2, 2): 0.5})
    with pytest.raises(sp.PlanError, match=r"\[0, 1\)"):
        sp.prune(m, x, ratio={m.body: 1.5})
    with pytest.raises(sp.PlanError, match="uniform allocator"):
        sp.prune(m, x, ratio={m.body: 0.5}, global_=True)


def test_report_shows_ignored_groups_every_frozen_reason_and_what_was_returned():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
            self.bil = nn.Bilinear(4, 4, 4)

        def forward(self, x):
            h = self.c(F.relu(self.b(F.relu(self.a(x)))))
            return self.bil(h, h)

    m = Net()
    x = torch.randn(3, 8)
    p = sp.prune(m, x, ratio=0.5, ignore=[m.b])
    rep = sp.report(m, p, x, ignore=[m.b])
    rows = {tuple(g.modules): g for g in rep.groups}
    assert rows[("b", "c")].ignored and rows[("b", "c")].units_after == 16
    assert not rows[("a", "b")].ignored and rows[("a", "b")].units_after == 8
    text = str(rep)
    assert "(ignored)" in text and "no rule for torch.nn.modules.linear.Bilinear" in text
    assert "a model output keeps its shape" in text  # every reason, not only the first
    assert "returned: a Net (the model's own class)" in text
    d = rep.to_dict()
    assert len(d["frozen_reasons"]) >= 2 and d["returned"].startswith("a Net")

    class Literal(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(F.relu(self.a(x)).view(-1, 16))

    lit = Literal()
    assert "literal size in forward had to change" in sp.report(lit, sp.prune(lit, x), x).returned


def test_prune_normalized_dims_is_opt_in_and_reports_its_measured_deviation():
    class Block(nn.Module):  # a pre-norm residual MLP block: the stream is LayerNorm'd
        def __init__(self):
            super().__init__()
            self.embed, self.norm = nn.Linear(6, 16), nn.LayerNorm(16)
            self.up, self.down, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.embed(x)
            h = h + self.down(F.gelu(self.up(self.norm(h))))
            return self.head(h)

    torch.manual_seed(0)
    m = randomize_(Block()).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    exact = sp.Pruner(m, x, ratio=0.5)
    p0 = exact.run()
    assert p0.embed.out_features == 16 and exact.deviation is None  # exact: stream kept
    assert sp.report(m, p0, x).deviation is None
    approx = sp.Pruner(m, x, ratio=0.5, prune_normalized_dims=True)
    p1 = approx.run()
    assert p1.embed.out_features == 8 and p1.norm.normalized_shape == (8,)
    assert approx.deviation is not None and approx.deviation > 1e-6  # not claimed exact
    rep = sp.report(m, p1, x)
    assert rep.deviation == approx.deviation and "deviates from the masked original" in str(rep)


@pytest.mark.parametrize("name", ["vit", "vit_manual"])
def test_head_ratio_prunes_heads_apart_from_channels(name):
    import models

    m = randomize_(models.get(name)).double().eval()
    x = tuple(t.double() for t in models.example_inputs(name))
    graph = sp.trace(m, x)
    heads = graph.head_groups()
    assert heads and all(graph.groups()[i].num_units == 3 for i in heads)
    pruner = sp.Pruner(m, x, ratio=0.5, head_ratio=0.34)
    plan = pruner.plan()
    kept = {g.id: g.num_units - len(plan.drops.get(g.id, [])) for g in pruner.graph.groups()}
    assert all(kept[i] == 2 for i in heads)  # one head of three goes
    assert all(kept[g.id] == g.num_units - g.num_units // 2 for g in pruner.graph.groups()
               if g.id not in heads)
    assert max_rel_diff(pruner.apply(plan)(*x), masked_output(pruner.graph, plan)) < 1e-9
    only_channels = sp.Pruner(m, x, ratio=0.5, head_ratio=0.0).plan()
    assert not set(only_channels.drops) & heads


@torch.fx.wrap
def _clip_to(size: list, x):
    size[0] = min(size[0], x.shape[-1])  # mutates its list argument (torchvision's Swin3d does)
    return x[..., : size[0]]


class _MutatesAList(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(_clip_to([3, 5], F.relu(self.a(x))))


def test_the_oracle_passes_plain_lists_to_functions_that_mutate_them():
    from structprune.testing import assert_oracle

    m, x = _MutatesAList().eval(), torch.randn(2, 4)
    pruned = assert_oracle(sp.Pruner(m, x, ratio=0.5))
    assert pruned(x).shape == (2, 2)
