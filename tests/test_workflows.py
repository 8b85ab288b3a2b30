"""Pruned models in the workflows around them: training on with a live optimizer, checkpoints,
pickling, non-tensor arguments (issue 10, items 1, 2, 5, 8)."""
import copy
import gzip
import io
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import masked_output, max_rel_diff

MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def digits(n_train=4000, n_test=1000):
    """MNIST from ../shared/data, pooled to 14x14 (small and fast), as float tensors."""
    def images(name, n):
        with gzip.open(os.path.join(MNIST, name)) as f:
            a = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784]
        x = torch.tensor(a, dtype=torch.float32).view(n, 1, 28, 28) / 255.0
        return F.avg_pool2d(x, 2)

    def labels(name, n):
        with gzip.open(os.path.join(MNIST, name)) as f:
            return torch.tensor(np.frombuffer(f.read(), np.uint8, offset=8)[:n], dtype=torch.long)

    return (images("train-images-idx3-ubyte.gz", n_train), labels("train-labels-idx1-ubyte.gz",
                                                                     n_train),
            images("t10k-images-idx3-ubyte.gz", n_test), labels("t10k-labels-idx1-ubyte.gz",
                                                                  n_test))


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        self.classifier = nn.Linear(32 * 9, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


def train(model, opt, x, y, epochs, batch=100):
    model.train()
    losses = []
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return float(np.mean(losses[-10:]))


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.Adam(ps, lr=3e-3),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
], ids=["adam", "sgd_momentum"])
def test_digits_train_prune_with_live_optimizer_train_on(make_opt):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    model = DigitsCNN()
    opt = make_opt(model.parameters())
    train(model, opt, xtr, ytr, epochs=2)
    acc_dense = accuracy(model, xte, yte)
    assert acc_dense > 0.85
    w0 = model.features[0].weight
    sp.prune_(model, xtr[:8], ratio=0.6, optimizer=opt, ignore=[model.classifier])
    assert model.features[0].weight is w0 and w0.shape[0] == 7  # identity kept, data sliced
    assert all(p.grad is None for p in model.parameters())
    state = opt.state[w0]
    for v in state.values():  # the moments / momentum buffers follow the weights
        if isinstance(v, torch.Tensor) and v.dim():
            assert v.shape == w0.shape
    acc_pruned = accuracy(model, xte, yte)
    before = [p.detach().clone() for p in model.parameters()]
    loss_after = train(model, opt, xtr, ytr, epochs=2)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), \
        "the optimizer no longer updates the pruned model"
    acc_recovered = accuracy(model, xte, yte)
    print("accuracy dense, pruned, recovered:", acc_dense, acc_pruned, acc_recovered)
    assert acc_recovered > max(acc_pruned, acc_dense - 0.05), (acc_dense, acc_pruned,
                                                              acc_recovered)
    assert loss_after < 0.5

    # a pruned model checkpoints like any module
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert accuracy(again, xte, yte) == acc_recovered
    assert accuracy(pickle.loads(pickle.dumps(model)), xte, yte) == acc_recovered


def test_prune_in_place_restores_the_optimizer_when_it_fails():
    from tests.test_pruner import LiteralView

    m = LiteralView()
    opt = torch.optim.Adam(m.parameters())
    x = torch.randn(2, 3, 8, 8)
    m(x).sum().backward()
    opt.step()
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()}
    with pytest.raises(sp.PlanError, match="cannot be pruned in place"):
        sp.prune_(m, x, optimizer=opt)
    for p in m.parameters():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in opt.state[p].items())
    assert m.conv.weight.shape == (8, 3, 3, 3) and m.conv.weight.grad is not None


def test_copy_result_of_sp_prune_pickles_and_has_no_stale_grads():
    m = DigitsCNN()
    x = torch.randn(4, 1, 14, 14)
    m(x).sum().backward()
    p = sp.prune(m, x, ratio=0.5)
    assert isinstance(p, DigitsCNN)
    assert all(q.grad is None for q in p.parameters())
    assert m.features[0].weight.grad is not None  # the input keeps its own
    p.eval()
    q = copy.deepcopy(p)
    torch.testing.assert_close(pickle.loads(pickle.dumps(p))(x), q(x))


class Args(nn.Module):
    """A model with float, str, bool and None arguments."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, scale: float = 2.0, mode: str = "sum", flag: bool = True, extra=None):
        h = self.a(x) * scale
        h = h + 1 if mode == "sum" else h - 1
        if flag:
            h = h.relu()
        if extra is not None:
            h = h + extra
        return self.b(h)


class ArgsShapeBranch(Args):
    """The same, plus a branch on a shape: fx fails and torch.export captures it."""

    def forward(self, x, scale: float = 2.0, mode: str = "sum", flag: bool = True, extra=None):
        if x.shape[0] > 1:
            x = x * 2
        return super().forward(x, scale, mode, flag, extra)


class ArgsLiteral(Args):
    """The same with a literal size: sp.prune returns the rewritten graph."""

    def forward(self, x, scale: float = 2.0, mode: str = "sum", flag: bool = True, extra=None):
        return super().forward(x, scale, mode, flag, extra).view(-1, 3)


@pytest.mark.parametrize("cls", [Args, ArgsShapeBranch, ArgsLiteral])
def test_non_tensor_arguments_are_honoured_or_refused(cls):
    torch.manual_seed(0)
    m = cls().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    p = sp.prune(m, (x, 3.0, "sum", True), ratio=0.5)
    p_out = p(x, 3.0, "sum", True)
    graph = sp.trace(m, (x, 3.0, "sum", True))
    assert graph.graph_module.meta["structprune_specialised"]["mode"] == "sum"
    # every call either equals the original with the same units masked, or is refused
    pruner = sp.Pruner(m, (x, 3.0, "sum", True), ratio=0.5)
    plan = pruner.plan()
    assert max_rel_diff(p_out, masked_output(pruner.graph, plan)) < 1e-9
    calls = [(x, 5.0, "sum", True), (x, 3.0, "mean", True), (x, 3.0, "sum", False), (x,),
             (x, 3.0, "sum", True, torch.ones(8, dtype=torch.float64))]
    honoured = []
    for args in calls:
        try:
            got = p(*args)
        except AssertionError as exc:
            assert "was captured for" in str(exc) and "Prune again" in str(exc)
            continue
        honoured.append(args)
        other = sp.trace(m, args)  # the original on these arguments, same units masked
        assert max_rel_diff(got, masked_output(other, sp.Plan(other, plan.drops))) < 1e-9
    if cls is not ArgsShapeBranch:  # fx keeps the float symbolic: another scale is honoured
        assert [a[1:] for a in honoured] == [(5.0, "sum", True), ()]
    else:  # export fixes every argument: only the example values (and equal defaults) run
        assert honoured == []
    with pytest.raises(AssertionError, match="mode='sum'"):
        p(x, 3.0, mode="mean")


def test_unstorable_argument_is_refused_naming_it():
    class Cfg:
        pass

    class WithCfg(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x, cfg=None):
            if x.shape[0] > 1:  # export capture: cfg becomes a constant
                x = x * 2
            return self.a(x)

    with pytest.raises(sp.TraceError, match="argument 'cfg'"):
        sp.trace(WithCfg(), (torch.randn(2, 4), {"k": 1}))


def test_in_place_on_an_export_captured_model_updates_module_attributes():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)

        def forward(self, x):
            if x.shape[-1] > 4:  # fx cannot trace this: torch.export captures it
                x = x * 2
            return self.conv2(torch.relu(self.bn(self.conv1(x))))

    m = Branchy().eval()
    w = m.conv1.weight
    sp.prune_(m, torch.randn(2, 3, 10, 10), ratio=0.5)
    assert m.conv1.weight is w and w.shape[0] == 4
    assert (m.conv1.out_channels, m.bn.num_features, m.conv2.in_channels) == (4, 4, 4)


def test_in_place_on_an_export_captured_grouped_conv_keeps_its_groups_right():
    """2 groups of 4 channels go by position, so ``groups`` stays 2 and each group narrows:
    the module's own forward runs after pruning in place and equals the pruned copy."""
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3)
            self.conv2 = nn.Conv2d(8, 8, 3, groups=2)
            self.conv3 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            if x.shape[-1] > 4:  # export capture
                x = x * 2
            return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))

    torch.manual_seed(0)
    m = Grouped().eval()
    x = torch.randn(2, 3, 10, 10)
    copy_ = sp.prune(m, x, ratio=0.5)
    sp.prune_(m, x, ratio=0.5)
    conv2 = m.conv2
    assert conv2.groups == 2 and conv2.in_channels == 4 and conv2.weight.shape[1] == 2
    assert conv2.out_channels == conv2.weight.shape[0] == 4
    torch.testing.assert_close(m(x), copy_(x))
