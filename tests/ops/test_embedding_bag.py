"""``nn.EmbeddingBag`` / ``F.embedding_bag`` (``ops/embedding_bag.py``): the embedding dim is
pruned in every mode; the pruned model equals a hand-built smaller ``nn.EmbeddingBag`` holding
the kept columns, and :func:`assert_rule` runs the oracle, zero-ratio identity, ONNX where the
exporter takes the op, and save/load."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import assert_rule

V, D = 20, 8


class Bag(nn.Module):
    def __init__(self, mode="mean", offsets=False, weighted=False, functional=False, **kw):
        super().__init__()
        self.offsets, self.weighted, self.functional = offsets, weighted, functional
        self.mode = mode
        self.bag = nn.EmbeddingBag(V, D, mode=mode, **kw)
        self.w = nn.Linear(4, 1)  # per-sample weights made in the model
        self.head = nn.Linear(D, 3)

    def forward(self, ids, offsets, feats):
        kw = {}
        if self.offsets:
            kw["offsets"] = offsets
        if self.weighted:
            kw["per_sample_weights"] = self.w(feats).reshape(ids.shape)
        if self.functional:
            e = F.embedding_bag(ids, self.bag.weight, mode=self.mode, **kw)
        else:
            e = self.bag(ids, **kw)
        return self.head(e)


def inputs(offsets):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (3, 4), generator=g)
    if offsets:
        ids = ids.flatten()
    return ids, torch.tensor([0, 2, 7]), torch.randn(12, 4, generator=g, dtype=torch.float64)


CASES = {
    "sum": dict(mode="sum"),
    "mean": dict(mode="mean"),
    "max": dict(mode="max"),
    "offsets_mean": dict(mode="mean", offsets=True),
    "offsets_sum_last_offset": dict(mode="sum", offsets=True, include_last_offset=True),
    "per_sample_weights": dict(mode="sum", offsets=True, weighted=True),
    "padding_idx": dict(mode="mean", padding_idx=3),
    "functional_max": dict(mode="max", functional=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_embedding_dim_is_pruned_in_every_mode(case):
    kw = dict(CASES[case])
    m = Bag(**kw).double().eval()
    x = inputs(kw.get("offsets", False))
    pruned = assert_rule(m, x, ratio=0.5)  # ONNX included: the exporter takes every mode
    kept = pruned.get_parameter("bag.weight").shape[1]
    assert kept == D // 2
    # Hand-built: the plan's kept columns, found from the pruned weight itself.
    w = m.bag.weight
    k = torch.tensor([j for j in range(D) if any(torch.equal(w[:, j], c)
                                                    for c in pruned.get_parameter("bag.weight").T)])
    assert len(k) == kept
    ref = nn.EmbeddingBag(V, kept, mode=m.mode, include_last_offset=m.bag.include_last_offset,
                          padding_idx=m.bag.padding_idx).double()
    with torch.no_grad():
        ref.weight.copy_(w[:, k])
    ids, offsets, feats = x
    extra = {}
    if m.offsets:
        extra["offsets"] = offsets
    if m.weighted:
        extra["per_sample_weights"] = m.w(feats).reshape(ids.shape)
    with torch.no_grad():
        want = F.linear(ref(ids, **extra), m.head.weight[:, k], m.head.bias)
        torch.testing.assert_close(pruned(*x), want)


def test_max_norm_keeps_the_embedding_dim_with_the_reason():
    m = Bag(mode="sum", max_norm=1.0).double().eval()
    g = sp.trace(m, inputs(False))
    assert any("max_norm" in e.reason for e in g.frozen())
    assert not any(p.qualname == "bag.weight" for grp in g.groups() for p in grp.params)
