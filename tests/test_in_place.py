"""``sp.prune_``: pruning the model object itself, with nothing copied.

The in-place result must equal ``sp.prune``'s copy (outputs, parameter shapes, module
attributes), keep tied weights tied, and any failure must leave the model exactly as it was.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import structprune as sp
from structprune.ops.linear import LinearRule
from structprune.testing import randomize_, run


def f64(name):
    torch.manual_seed(0)
    m = randomize_(models.get(name)).double().eval()
    return m, tuple(x.double() for x in models.example_inputs(name))


def state(m):
    """Every parameter/buffer object and plain attribute of every module, by path."""
    return {name: ({k: v for k, v in mod.__dict__.items()
                    if not k.startswith("_") and not isinstance(v, nn.Module)},
                   dict(mod._parameters), dict(mod._buffers))
            for name, mod in m.named_modules()}


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "densenet", "senet", "unet",
                                  "convnext", "resnext"])
def test_in_place_equals_the_copy(name):
    m, x = f64(name)
    ref = sp.prune(m, x, ratio=0.5)
    n_before = sum(p.numel() for p in m.parameters())
    out = sp.prune_(m, x, ratio=0.5)
    assert out is m and type(m) is not torch.fx.GraphModule
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters()) \
        < n_before
    torch.testing.assert_close(run(m, x), run(ref, x), rtol=1e-9, atol=1e-12)
    ref_params = dict(ref.named_parameters())
    for k, p in m.named_parameters():
        if k in ref_params:
            assert p.shape == ref_params[k].shape, k
    for k, mod in m.named_modules():  # attributes the model's own forward reads
        for attr in ("in_channels", "out_channels", "groups", "in_features", "out_features",
                     "num_features", "normalized_shape", "embed_dim", "num_heads", "head_dim"):
            if hasattr(mod, attr):
                r = ref.get_submodule(k) if k else ref
                if hasattr(r, attr):
                    assert getattr(mod, attr) == getattr(r, attr), (k, attr)


def test_in_place_keeps_ties_and_runs_iteratively():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.b2 = nn.Linear(8, 8)
            self.b2.weight = self.b.weight

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(h)) + torch.relu(self.b2(h)))

    torch.manual_seed(0)
    m = Tied().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = sp.prune(m, x, ratio=0.5, iterative_steps=2)
    sp.prune_(m, x, ratio=0.5, iterative_steps=2)
    assert m.b2.weight is m.b.weight and m.a.out_features == 4
    torch.testing.assert_close(run(m, x), run(ref, x))


class Refusing(LinearRule):
    """A linear rule whose update gives up: the apply pass must raise and roll back."""

    def update(self, actx):
        if actx.node.target == "fc":
            raise NotImplementedError("refused for the test")
        return super().update(actx)


def test_a_failure_midway_leaves_the_model_as_it_was():
    m, x = f64("resnet20")
    before_state = state(m)
    before_sd = copy.deepcopy(m.state_dict())
    y = run(m, x)
    with pytest.raises(sp.UnsupportedOpError, match="refused for the test"):
        sp.prune_(m, x, ratio=0.5, rules={nn.Linear: Refusing()})
    after = state(m)
    assert after.keys() == before_state.keys()
    for k in before_state:
        attrs, params, buffers = before_state[k]
        a2, p2, b2 = after[k]
        assert attrs == a2, k
        assert all(params[n] is p2[n] for n in params) and params.keys() == p2.keys(), k
        assert all(buffers[n] is b2[n] for n in buffers) and buffers.keys() == b2.keys(), k
    assert all(torch.equal(before_sd[k], v) for k, v in m.state_dict().items())
    torch.testing.assert_close(run(m, x), y)
    sp.prune_(m, x, ratio=0.5)  # and it can still be pruned afterwards
    assert m.conv1.out_channels == 8


def test_uneven_chunks_are_refused_and_rolled_back():
    """ShuffleNetV2's ``x.chunk(2, dim=1)`` must become an uneven split after pruning, which the
    model's own forward cannot do: in place is refused, the copy carries the rewritten split."""
    m, x = f64("shufflenetv2")
    before = copy.deepcopy(m.state_dict())
    y = run(m, x)
    with pytest.raises(sp.PlanError, match="cannot be pruned in place"):
        sp.prune_(m, x, ratio=0.5)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    torch.testing.assert_close(run(m, x), y)
    assert "split" in sp.prune(m, x, ratio=0.5).code


class LiteralAfterSteps(nn.Module):
    """Step 1 prunes only ``c1`` (in place is fine); a later step must change the literal in
    ``view(.., 4 * 8 * 8)``, so in place is refused then -- and step 1 must be undone too."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = self.c2(torch.relu(self.c1(x)))
        return self.fc(h.view(h.size(0), 4 * 8 * 8))


def test_iterative_in_place_is_all_steps_or_none():
    torch.manual_seed(0)
    m = LiteralAfterSteps().eval()
    x = torch.randn(2, 3, 8, 8)
    before = {k: v for k, v in m.state_dict(keep_vars=True).items()}
    with pytest.raises(sp.PlanError, match="cannot be pruned in place"):
        sp.prune_(m, x, ratio=0.5, iterative_steps=4)
    assert m.c1.out_channels == 64
    assert all(v is before[k] for k, v in m.state_dict(keep_vars=True).items())


class TracedHead(nn.Module):  # not a leaf: fx traces through it, so gm never names its weight
    def __init__(self, w):
        super().__init__()
        self.weight = w

    def forward(self, h):
        return F.linear(h, self.weight)


class TiedThroughTrace(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = TracedHead(self.emb.weight)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def test_a_tie_through_a_traced_module_stays_tied():
    torch.manual_seed(0)
    m = TiedThroughTrace().double().eval()
    ids = torch.randint(0, 10, (2, 5))
    ref = sp.prune(m, ids, ratio=0.5)
    sp.prune_(m, ids, ratio=0.5)
    assert m.head.weight is m.emb.weight and m.emb.weight.shape[1] < 16
    torch.testing.assert_close(run(m, ids), run(ref, ids))


class ListHeldScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)
        self.scales = [torch.rand(1, 16, 1, 1) + 0.5]  # not a buffer: fx lifts it as a constant

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)) * self.scales[0])


def test_a_lifted_tensor_constant_refuses_in_place():
    torch.manual_seed(0)
    m = ListHeldScale().eval()
    x = torch.randn(2, 3, 8, 8)
    y = run(m, x)
    with pytest.raises(sp.PlanError, match="not a parameter, buffer"):
        sp.prune_(m, x, ratio=0.5)
    assert m.c1.out_channels == 16 and m.scales[0].shape[1] == 16
    torch.testing.assert_close(run(m, x), y)
    assert run(sp.prune(m, x, ratio=0.5), x).shape == y.shape  # the copy carries its own slice
