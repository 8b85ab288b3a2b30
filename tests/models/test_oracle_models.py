"""Every reference model: pruned at 30/50/70% with l2 and random importance passes the oracle
(float64, max rel diff <= 1e-5); at 50% also zero-ratio identity, ONNX parity and save/load."""
import pytest
import torch

import models
import structprune as sp
from structprune.testing import Pruner, assert_oracle, assert_rule, randomize_

NAMES = models.names()


def _model(name):
    torch.manual_seed(0)
    m = randomize_(models.get(name)).double().eval()
    x = tuple(t.double() for t in models.example_inputs(name))
    return m, x


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("importance", ["l2", "random"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_oracle(name, importance, ratio):
    m, x = _model(name)
    n0 = sum(p.numel() for p in m.parameters())
    pruned = assert_oracle(Pruner(m, x, ratio=ratio, importance=importance), tol=1e-5)
    n1 = sum(p.numel() for p in pruned.parameters())
    assert n1 < n0 * (1 - ratio / 3), f"{name}: only {1 - n1 / n0:.0%} of parameters removed"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("importance", ["l2", "random"])
def test_all_checks_at_half(name, importance):
    m, x = _model(name)
    pruned = assert_rule(m, x, ratio=0.5, importance=importance, onnx=importance == "l2")
    rep = sp.report(m, pruned, x)
    assert rep.macs_kept < 0.8 and rep.params_kept < 0.8
