"""RMSNorm residual streams are pruned exactly; LayerNorm's only by the opt-in approximate rule.

Removing ``d - d'`` of the ``d`` entries an RMSNorm normalises equals zeroing them once the kept
weight is scaled by ``sqrt(d/d')`` and eps by ``d/d'``. The blocks here are Llama/Qwen-shaped
(RMSNorm -> q/k/v with heads -> SDPA -> o_proj -> residual add; RMSNorm -> SwiGLU -> residual add;
final RMSNorm -> lm head); the hidden (residual) dim is pruned and checked against the masked
original, which zeroes the dropped hidden entries everywhere.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.rules import Space
from structprune.ops.norm import ApproximateLayerNormRule, normalized_dims_rules
from structprune.plan import Plan
from structprune.pruner import Pruner
from structprune.testing import masked_output, max_rel_diff, run

aten = torch.ops.aten


class FunctionalRMSNorm(nn.Module):
    """``F.rms_norm`` with the weight read as a graph value (``eps=None`` by default)."""

    def __init__(self, d, eps=None):
        super().__init__()
        self.weight, self.eps, self.d = nn.Parameter(1 + 0.3 * torch.randn(d)), eps, d

    def forward(self, x):
        return F.rms_norm(x, (self.d,), self.weight, self.eps)


def rms(kind, d, eps):
    if kind == "module":
        m = nn.RMSNorm(d, eps=eps)
        with torch.no_grad():
            m.weight.copy_(1 + 0.3 * torch.randn(d))
        return m
    return FunctionalRMSNorm(d, eps)


class Block(nn.Module):
    def __init__(self, d, heads, head_dim, ffn, kind, eps):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.attn_norm, self.mlp_norm = rms(kind, d, eps), rms(kind, d, eps)
        self.q, self.k, self.v = (nn.Linear(d, heads * head_dim, bias=False) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, d, bias=False)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, kind="module", eps=1e-6, vocab=11, d=12, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, 2, 3, 10, kind, eps) for _ in range(layers))
        self.norm, self.lm_head = rms(kind, d, eps), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))


def _hidden_group(graph):
    """The group holding the residual stream: the embedding's columns."""
    for g in graph.groups():
        if any(m.space == Space.param("embed.weight", 1) for m in g.params):
            return g
    raise AssertionError(f"the hidden dim is not prunable; frozen: {graph.frozen()[:4]}")


@pytest.mark.parametrize("kind, eps", [("module", 1e-6), ("module", None),
                                       ("functional", 1e-5), ("functional", None)])
def test_llama_hidden_dim_pruned_exactly(kind, eps):
    torch.manual_seed(0)
    model = TinyLlama(kind, eps).double().eval()
    ids = torch.randint(0, 11, (2, 5))
    pruner = Pruner(model, ids)
    g = _hidden_group(pruner.graph)
    plan = Plan(pruner.graph, {g.id: torch.tensor([0, 4, 5, 9])})
    pruned = pruner.apply(plan)
    d = max_rel_diff(run(pruned, ids), masked_output(plan.graph, plan))
    assert d < 1e-10, f"pruned TinyLlama ({kind}, eps={eps}) differs by {d:.3e}"
    assert pruned.get_parameter("embed.weight").shape == (11, 8)
    assert pruned.get_parameter("norm.weight").shape == (8,)
    if kind == "module":
        n = pruned.get_submodule("norm")
        assert n.normalized_shape == (8,)
        base = 1e-6 if eps is not None else torch.finfo(torch.float64).eps
        assert n.eps == pytest.approx(base * 12 / 8)
        w = model.norm.weight.detach()[[1, 2, 3, 6, 7, 8, 10, 11]] * math.sqrt(12 / 8)
        torch.testing.assert_close(n.weight.detach(), w)
        assert model.norm.eps == eps and model.norm.normalized_shape == (12,)  # untouched
    # The rescaled model is a fixed point: pruning it again by nothing changes nothing.
    again = sp.prune(pruned, ids, ratio=0.0)
    assert max_rel_diff(run(again, ids), run(pruned, ids)) == 0.0


def test_rescale_is_what_makes_it_exact():
    """Masking = removal holds only with the rescale: removal without it differs."""
    torch.manual_seed(0)
    x = torch.randn(3, 12, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(12, dtype=torch.float64)
    keep = torch.tensor([1, 2, 3, 6, 7, 8, 10, 11])
    masked = torch.zeros_like(x)
    masked[:, keep] = x[:, keep]
    want = F.rms_norm(masked, (12,), w, 1e-3)[:, keep]
    plain = F.rms_norm(x[:, keep], (8,), w[keep], 1e-3)
    scaled = F.rms_norm(x[:, keep], (8,), w[keep] * math.sqrt(12 / 8), 1e-3 * 12 / 8)
    assert (plain - want).abs().max() > 1e-2
    torch.testing.assert_close(scaled, want)


def test_rms_norm_in_place_and_random_plans():
    torch.manual_seed(1)
    model = TinyLlama("module", 1e-6).double().eval()
    ids = torch.randint(0, 11, (2, 5))
    want_model = TinyLlama("module", 1e-6).double().eval()
    want_model.load_state_dict(model.state_dict())
    pruner = Pruner(model, ids, ratio=0.4, importance="random")
    plan = pruner.plan()
    assert _hidden_group(pruner.graph).id in plan.drops
    want = masked_output(plan.graph, plan)
    sp.prune_(want_model, ids, ratio=0.4, importance="random")
    got = run(pruner.apply(plan), ids)
    assert max_rel_diff(got, want) < 1e-10
    assert want_model.norm.weight.shape[0] < 12  # in place: the module itself shrank


def test_rms_norm_without_weight_stays_frozen():
    model = nn.Sequential(nn.Linear(4, 8), nn.RMSNorm(8, elementwise_affine=False), nn.Linear(8, 2))
    graph = sp.trace(model, torch.randn(3, 4))
    assert graph.is_frozen(Space.param("0.weight", 0))
    assert any("no weight" in e.reason for e in graph.frozen())


class ViTBlock(nn.Module):
    def __init__(self, d=8, ffn=16):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.n1, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.n2, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.n1(h))))
        return self.head(F.layer_norm(h, (h.shape[-1],), self.n2.weight, self.n2.bias))


def test_approximate_layer_norm_rule_shrinks_the_residual_dim():
    torch.manual_seed(0)
    model = ViTBlock().eval()
    x = torch.randn(2, 5, 6)
    assert sp.trace(model, x).is_frozen(Space.param("embed.weight", 0))  # built-in: exact, frozen
    rules = normalized_dims_rules()
    assert set(rules) >= {nn.LayerNorm, F.layer_norm, aten.layer_norm.default}
    assert all(isinstance(r, ApproximateLayerNormRule) and r.exact is False for r in rules.values())
    pruned = sp.prune(model, x, ratio=0.5, rules=rules)
    assert pruned.get_parameter("embed.weight").shape[0] == 4
    assert pruned.get_submodule("n1").normalized_shape == (4,)
    assert pruned.get_parameter("n2.weight").shape == (4,)
    out = run(pruned, x)
    assert out.shape == (2, 5, 3) and torch.isfinite(out).all()


class ShapeBranch(nn.Module):
    """fx cannot trace the branch on a size, so the graph is captured by torch.export, whose
    graph calls ``aten.rms_norm.default(x, [d], weight)``."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(4, 8), nn.RMSNorm(8), nn.Linear(8, 3)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.3 * torch.randn(8))

    def forward(self, x):
        h = self.inp(x)
        if h.shape[0] > 1:
            h = h * 2
        return self.out(self.norm(h))


def test_export_captured_rms_norm_is_exact():
    torch.manual_seed(0)
    model = ShapeBranch().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    pruner = Pruner(model, x, ratio=0.5)
    gm = pruner.graph.graph_module
    assert gm.meta.get("structprune_capture") == "export"
    assert any(n.target is aten.rms_norm.default for n in gm.graph.nodes)
    plan = pruner.plan()
    assert not plan.is_empty
    d = max_rel_diff(run(pruner.apply(plan), x), masked_output(plan.graph, plan))
    assert d < 1e-10
