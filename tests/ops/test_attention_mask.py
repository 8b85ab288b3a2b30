"""An attention mask or additive bias with one row per head (T5's relative position bias) is
pruned with the heads it belongs to; before, the heads went and the bias kept them all."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import assert_rule


class HeadBias(nn.Module):
    def __init__(self, d=16, h=4, buckets=8):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.rel = nn.Embedding(buckets, h)

    def forward(self, x, pos):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.h, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        bias = self.rel(pos).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(a.transpose(1, 2).reshape(b, t, d))


def test_a_per_head_bias_is_pruned_with_its_heads():
    torch.manual_seed(0)
    m = HeadBias().double()
    x, pos = torch.randn(2, 5, 16, dtype=torch.float64), torch.randint(0, 8, (5, 5))
    heads = [g for g in sp.trace(m, (x, pos)).groups() if g.num_units == 4 and g.width == 4]
    assert heads, "the heads must stay prunable"
    p = assert_rule(m, (x, pos), ratio=0.5)
    assert p.rel.weight.shape == (8, 2)


def test_a_mask_from_the_inputs_keeps_the_heads_whole():
    class InputMask(HeadBias):
        def forward(self, x, mask):
            b, t, d = x.shape
            q, k, v = (f(x).view(b, t, self.h, -1).transpose(1, 2)
                       for f in (self.q, self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                          .transpose(1, 2).reshape(b, t, d))

    m = InputMask().double()
    x, mask = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(1, 4, 5, 5,
                                                                      dtype=torch.float64)
    graph = sp.trace(m, (x, mask))
    assert not any(p.module in ("q", "k") for g in graph.groups() for p in g.params)
    p = assert_rule(m, (x, mask), ratio=0.5)  # value channels per head may still go
    assert p.q.weight.shape == (16, 16) and p.k.weight.shape == (16, 16)
