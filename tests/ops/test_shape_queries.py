"""Shape queries (``x.size(d)``, ``x.shape[d]``, ``x.numel()``) and ``x.new_tensor(data)``.

A queried dim may stay prunable only while its size feeds shape arguments (a ``view``'s sizes,
a factory's size), which the apply pass rewrites to the pruned sizes. Where the size becomes a
value (``h.sum() / h.size(-1)``, attention's ``q.size(-1) ** -0.5``, ``new_full``'s fill value),
pruning the dim would change that value, and the masked original would not: the dim is frozen.
"""
import math

import pytest
import torch
import torch.nn as nn

import structprune as sp
from structprune.rules import Space
from structprune.plan import Plan
from structprune.pruner import Pruner
from tests.ops.helpers import random_drops
from structprune.testing import assert_rule, masked_output, max_rel_diff, run

D = torch.float64


def oracle_on_every_group(model, x, seed=0):
    """Drop random units of every group; return (max deviation from the masked original, how
    many units went, the graph)."""
    pruner = Pruner(model, x)
    graph = pruner.graph
    drops = random_drops(graph, seed)
    plan = Plan(graph, drops)
    got = run(pruner.apply(plan), x)
    return max_rel_diff(got, masked_output(graph, plan)), plan.num_dropped(), graph


def prunable(graph, node, dim):
    """Whether some index of ``node``'s ``dim`` is in a prunable group."""
    return not graph.is_frozen(Space.activation(node, dim))


def reasons(graph):
    return " | ".join(e.reason for e in graph.frozen())


def tok(t=5, c=6):
    torch.manual_seed(0)
    return torch.randn(2, t, c, dtype=D)


class Tokens(nn.Module):
    """Linear(6 -> 8) on [B, T, 6] tokens; ``op(self, h)`` -> Linear(8 -> 3)."""

    def __init__(self, op, c=8):
        super().__init__()
        self.pre, self.post, self.op = nn.Linear(6, c), nn.Linear(c, 3), op
        self.v = nn.Parameter(torch.randn(c, c))

    def forward(self, x):
        return self.post(self.op(self, self.pre(x)))


# Each op reads h's last dim (8 features, prunable through pre/post) as a value.
VALUE_USES = {
    # a hand-written mean of products over the features (matmul keeps them prunable)
    "hand_mean": lambda m, h: (h @ m.v) / h.size(-1),
    "shape_getitem_scale": lambda m, h: (h @ m.v) * h.shape[-1] ** -0.5,
    "math_sqrt": lambda m, h: (h @ m.v) / math.sqrt(h.size(-1)),
    "size_tuple_unpacked": lambda m, h: (h @ m.v) / h.size()[2],
    "numel": lambda m, h: (h @ m.v) * (h.size(0) * h.size(1) * 8 / h.numel()),
    "new_full_fill_value": lambda m, h: (h @ m.v) * h.new_full((1, 1, 1), h.size(-1)),
    "compare": lambda m, h: (h @ m.v) * (h.size(-1) > 7),
}


@pytest.mark.parametrize("name", sorted(VALUE_USES))
def test_size_used_as_value_freezes_the_dim(name):
    model = Tokens(VALUE_USES[name]).double().eval()
    d, n, graph = oracle_on_every_group(model, tok())
    assert d < 1e-9, f"{name}: pruned differs from the masked original by {d:.3e}"
    assert not prunable(graph, "pre", 2), f"{name}: the queried feature dim stayed prunable"
    assert "used as a value" in reasons(graph)


class Attention(nn.Module):
    """Multi-head self-attention with the scale read from ``q.size(-1)`` (the head dim).

    ``mean_heads`` takes the largest attention map over heads into the output, which freezes the
    heads: the reshape's choice then falls on the head dim, which the scale freezes as well.
    """

    def __init__(self, dim=12, heads=3, mean_heads=False, single_head=False):
        super().__init__()
        self.h = 1 if single_head else heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.mean_heads, self.single_head = mean_heads, single_head

    def forward(self, x):
        B, T, _ = x.shape
        if self.single_head:
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            q, k, v = (f(x).view(B, T, self.h, -1).transpose(1, 2)
                       for f in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1) * q.size(-1) ** -0.5).softmax(-1)
        o = attn @ v
        if not self.single_head:
            H, D = o.size(1), o.size(-1)  # only shape arguments: heads stay prunable
            o = o.transpose(1, 2).reshape(B, T, H * D)
        out = self.proj(o)
        if self.mean_heads:
            out = out + attn.amax(1).sum(-1, keepdim=True)
        return out


def test_attention_heads_stay_prunable_head_dim_scale_is_exact():
    torch.manual_seed(0)
    model = Attention().double().eval()
    x = torch.randn(2, 5, 12, dtype=D)
    d, n, graph = oracle_on_every_group(model, x)
    assert d < 1e-9, f"pruned differs from the masked original by {d:.3e}"
    # q's output [B, T, 12] is heads x head_dim: the group prunes whole heads (4 features each)
    qgroup = [g for g in graph.groups() if any(m.module == "q" for m in g.params)]
    assert qgroup and qgroup[0].num_units == 3 and qgroup[0].width == 4, qgroup
    pruned = assert_rule(model, x, drop={"q": [4]}, onnx=False, save_load=False)
    assert pruned.q.out_features == 8 and pruned.k.out_features == 8


@pytest.mark.parametrize("kind", ["mean_heads", "single_head"])
def test_attention_head_dim_read_by_scale_is_frozen(kind):
    torch.manual_seed(0)
    model = Attention(**{kind: True}).double().eval()
    x = torch.randn(2, 5, 12, dtype=D)
    d, n, graph = oracle_on_every_group(model, x)
    assert d < 1e-9, f"{kind}: pruned differs from the masked original by {d:.3e}"
    assert not prunable(graph, "q", 2) and not prunable(graph, "k", 2)
    assert "used as a value" in reasons(graph)
    assert prunable(graph, "v", 2), "the value path does not read the scale and stays prunable"


class ViewBC(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        y = y.view(y.size(0), y.size(1), -1)  # sizes only reshape
        z = y.new_zeros(y.size(0), y.size(1))  # and size a factory
        return self.fc(y.mean(-1) + z)


def test_sizes_in_shape_arguments_stay_prunable():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, dtype=D)
    model = ViewBC().double().eval()
    graph = sp.trace(model, x)
    assert [g.num_units for g in graph.groups()] == [8]
    pruned = assert_rule(model, x, drop={"conv": [1, 5]}, onnx=False, save_load=False)
    assert pruned.conv.out_channels == 6


class OtherGroupSizes(nn.Module):
    """Sizes read from ``x`` shape ``y``'s view, factory, expand and split; x and y are two
    groups, so either may shrink while the other keeps its size."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
        self.c, self.d = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, inp):
        x, y = self.a(inp), self.b(inp)
        B, T, C = x.shape
        z = y.view(B, T, C) + y.new_zeros(B, T, C) + y.expand(B, T, C)
        u, w = torch.split(z, [C // 2, C - C // 2], dim=-1)
        return self.c(torch.cat([w, u], -1)) + self.d(x)


@pytest.mark.parametrize("drop", [{"a": [1, 2]}, {"b": [0, 5]}, {"a": [0], "b": [3, 4, 7]}])
def test_sizes_of_another_group_are_rewritten(drop):
    """The apply pass compares each size argument's value with the plan, not the node's old
    and new shapes (which agree when only the other group shrinks)."""
    torch.manual_seed(0)
    model = OtherGroupSizes().double().eval()
    x = tok()
    assert len(sp.trace(model, x).groups()) == 3  # a; b in two halves (the split)
    pruned = assert_rule(model, x, drop=drop, onnx=False, save_load=False)
    assert pruned.a.out_features == 8 - len(drop.get("a", ()))
    assert pruned.b.out_features == 8 - len(drop.get("b", ()))


def test_size_returned_with_the_output_freezes_the_dim():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(h), h.size(-1)

    graph = sp.trace(M().double(), tok())
    assert not prunable(graph, "a", 2)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_new_tensor_output_is_the_data():
    """``x.new_tensor(data)`` is ``data`` (x gives only dtype and device): data's dims map to
    the output, x's are read for nothing."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(6, 4), nn.Linear(8, 3)

        def forward(self, x):
            small, big = self.b(x), self.a(x)
            return self.c(small.new_tensor(big)) + small.sum(-1, keepdim=True)

    torch.manual_seed(0)
    model = M().double().eval()
    d, n, graph = oracle_on_every_group(model, tok())
    assert d < 1e-9, f"pruned differs from the masked original by {d:.3e}"
    assert prunable(graph, "a", 2), "new_tensor's data should carry a's features through"


def test_new_tensor_of_a_literal_is_a_frozen_constant():
    """``h.new_tensor([...])`` holds one value per index that nothing can slice: what it meets
    stays whole, and ``h`` itself is read only for its dtype."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
            self.c, self.d = nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            h, g = self.a(x), self.b(x)
            return self.c(g + h.new_tensor([float(i) for i in range(8)])) + self.d(h)

    torch.manual_seed(0)
    d, n, graph = oracle_on_every_group(M().double().eval(), tok())
    assert d < 1e-9, f"pruned differs from the masked original by {d:.3e}"
    assert not prunable(graph, "b", 2), "b's features meet the constant"
    assert prunable(graph, "a", 2), "h is read by new_tensor only for its dtype"
