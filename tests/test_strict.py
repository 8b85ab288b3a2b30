"""Strict mode (on in this test suite): a rule that raises is an error, not a frozen op."""
import pytest
import torch
import torch.nn as nn

import structprune as sp
from structprune.ops.linear import LinearRule


class Broken(LinearRule):
    def couple(self, ctx):
        raise KeyError("a bug in the rule")


def test_a_raising_rule_is_an_error_in_strict_mode_and_frozen_with_its_reason_otherwise(
        monkeypatch):
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    with pytest.raises(sp.UnsupportedOpError, match="strict mode: Broken raised .*a bug"):
        sp.trace(m, x, rules={nn.Linear: Broken()})
    monkeypatch.setenv("STRUCTPRUNE_STRICT", "0")
    g = sp.trace(m, x, rules={nn.Linear: Broken()})
    assert not g.groups() and any("Broken cannot handle this call" in e.reason for e in g.frozen())


def test_a_reduction_over_an_empty_dim_list_reduces_everything():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    x = torch.randn(2, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = m

        def forward(self, x):
            return torch.ops.aten.mean.dim(self.body(x), [])

    g = sp.trace(Net(), x)  # strict: the rule must handle it (it raised before)
    # a mean over everything is a sum over the original count: the channels prune exactly
    assert g.groups()
    from structprune.testing import assert_oracle

    pruned = assert_oracle(sp.Pruner(Net(), x, ratio=0.5))
    assert pruned.get_parameter("body.0.weight").shape[0] == 4
