"""``nn.MultiheadAttention`` with masks and ``torch.nn``'s transformer modules
(``ops/attention.py``, ``ops/transformer.py``: traced through functional equivalents).

For each: the traced graph computes what the module computes (eval and train mode, dropout 0);
heads (q/k/v together) and feed-forward neurons are prunable while ``d_model`` stays whole;
the pruned model equals a hand-built reference, PyTorch's own module with the dropped heads'
and neurons' input rows zeroed (such a head or neuron then adds exactly nothing); and
:func:`assert_rule` runs the oracle, zero-ratio identity, ONNX where the exporter takes the
graph, and save/load.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.plan import Plan
from structprune.testing import assert_oracle, assert_rule, randomize_

B, T, E, HEADS = 2, 5, 16, 4


def kpm():
    return torch.tensor([[False] * T, [False] * 3 + [True] * 2])


def causal():
    return torch.triu(torch.ones(T, T, dtype=torch.bool), 1)


def graph_equals_module(m, inputs):
    """The traced equivalent gives the module's own outputs, in eval and in train mode."""
    for train in (False, True):
        m.train(train)
        g = sp.trace(m, inputs)
        assert not any(n.op == "call_module" and "Transformer" in type(
            g.modules.get(str(n.target))).__name__ for n in g.graph_module.graph.nodes
            if n.op == "call_module")
        with torch.no_grad():
            got, want = g.graph_module(*inputs), m(*inputs)
        torch.testing.assert_close(got, want)
    m.eval()


_ZEROED = ("in_proj_weight", "in_proj_bias", "linear1.weight", "linear1.bias")


def zeroed_reference(model, plan):
    """PyTorch's own modules with the dropped rows of every attention's q/k/v projection and
    every first feed-forward linear set to zero."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for space, idx in plan.dropped_indices().items():
            name = space.param_name
            if name and space.dim == 0 and name.endswith(_ZEROED) and len(idx):
                params[name][torch.as_tensor(idx)] = 0
    return ref


def heads_and_neurons_plan(graph, seed=0):
    """Drop one unit of every head group and half of every feed-forward group."""
    g = torch.Generator().manual_seed(seed)
    drops = {}
    heads = graph.head_groups()
    for grp in graph.groups():
        names = {p.qualname for p in grp.params if p.dim == 0}
        if grp.id in heads:
            drops[grp.id] = torch.randperm(grp.num_units, generator=g)[:1].sort().values
        elif any(n.endswith("linear1.weight") for n in names):
            drops[grp.id] = torch.randperm(grp.num_units, generator=g)[:grp.num_units // 2] \
                .sort().values
    return Plan(graph, drops)


# --- nn.MultiheadAttention with masks -------------------------------------------------------------

class MHA(nn.Module):
    def __init__(self, kind, batch_first=True, need_weights=False, average=True):
        super().__init__()
        self.kind, self.bf, self.nw, self.avg = kind, batch_first, need_weights, average
        self.inp = nn.Linear(6, E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.head_bias = nn.Linear(6, HEADS)  # a per-head additive mask made in the model
        self.out = nn.Linear(E, 3)

    def forward(self, x, mask):
        h = self.inp(x)
        if not self.bf:
            h = h.transpose(0, 1)
        kw = {}
        if self.kind == "padding":
            kw["key_padding_mask"] = mask
        elif self.kind == "causal":
            kw.update(attn_mask=mask, is_causal=True)
        elif self.kind == "per_head":  # (B*H, T, T), row b*H + h for head h
            b, t = x.shape[0], x.shape[1]
            bias = self.head_bias(x).transpose(1, 2).unsqueeze(-1).expand(b, HEADS, t, t)
            kw.update(attn_mask=bias.reshape(b * HEADS, t, t), key_padding_mask=mask)
        else:
            kw["attn_mask"] = mask
        o, w = self.attn(h, h, h, need_weights=self.nw, average_attn_weights=self.avg, **kw)
        if not self.bf:
            o = o.transpose(0, 1)
        y = self.out(o)
        if self.nw and not self.avg:  # per-head weights, read as a sum over heads (exact); a
            return y, w.sum((1, 3))  # mean over heads is exact only as sum / original count
        return y


MHA_CASES = {
    "key_padding_mask": (dict(kind="padding"), kpm),
    "key_padding_mask_need_weights": (dict(kind="padding", need_weights=True), kpm),
    "float_key_padding_mask": (dict(kind="padding"),
                               lambda: kpm().double().masked_fill(kpm(), -1e9)),
    "is_causal": (dict(kind="causal"), causal),
    "float_2d_mask_seq_first": (dict(kind="mask", batch_first=False),
                                lambda: torch.randn(T, T, dtype=torch.float64)),
    "per_head_3d_mask": (dict(kind="per_head"), kpm),
    "per_head_weights": (dict(kind="per_head", need_weights=True, average=False), kpm),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_masked_attention_prunes_heads_like_pytorchs_own_module(case):
    kw, mask = MHA_CASES[case]
    torch.manual_seed(0)
    m = MHA(**kw).double().eval()
    x = torch.randn(B, T, 6, dtype=torch.float64)
    inputs = (x, mask())
    graph_equals_module(m, inputs)
    pruner = sp.Pruner(m, inputs, ratio=0.5)
    assert pruner.graph.head_groups(), "the heads must stay prunable"
    plan = heads_and_neurons_plan(pruner.graph)
    pruned = assert_oracle(pruner, plan)
    assert pruned.get_parameter("attn.in_proj_weight").shape == (3 * E * 3 // 4, E)
    with torch.no_grad():
        got, want = pruned(*inputs), zeroed_reference(m, plan)(*inputs)
    if m.nw and not m.avg:  # a zeroed head still has attention weights (a removed one has
        got, want = got[0], want[0]  # none): the outputs are compared, the weights by the oracle
    torch.testing.assert_close(got, want)
    if case == "per_head_3d_mask":  # the mask's rows of a dropped head went with it
        assert pruned.get_parameter("head_bias.weight").shape == (HEADS - 1, 6)
        assert_rule(m, inputs, ratio=0.5, onnx=True)


def test_a_per_head_mask_given_as_input_keeps_the_heads_whole():
    m = MHA("mask").double().eval()
    x = torch.randn(B, T, 6, dtype=torch.float64)
    mask = torch.randn(B * HEADS, T, T, dtype=torch.float64)
    graph_equals_module(m, (x, mask))
    g = sp.trace(m, (x, mask))
    assert not g.head_groups()
    assert_rule(m, (x, mask), ratio=0.5, onnx=False)  # per-head value channels still go


@pytest.mark.parametrize("batch_first", [True, False])
def test_unbatched_attention_and_encoder_layer(batch_first):
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, E)
            self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
            self.layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0,
                                                    batch_first=batch_first)
            self.out = nn.Linear(E, 3)

        def forward(self, x, padding):  # x: (T, 6), padding: (T,)
            h = self.inp(x)
            a, w = self.attn(h, h, h, key_padding_mask=padding, average_attn_weights=False)
            return self.out(self.layer(a, src_key_padding_mask=padding)), w.sum(0)

    torch.manual_seed(0)
    m = Unbatched().double().eval()
    inputs = (torch.randn(T, 6, dtype=torch.float64), kpm()[1])
    graph_equals_module(m, inputs)
    assert sp.trace(m, inputs).head_groups()
    pruned = assert_rule(m, inputs, ratio=0.5, onnx=batch_first)
    assert pruned.get_parameter("attn.in_proj_weight").shape[0] == 3 * E // 2  # 2 heads left


# --- the transformer modules ----------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, nested=False, **kw):
        super().__init__()
        self.inp = nn.Linear(6, E)
        layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True, **kw)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E),
                                         enable_nested_tensor=nested)
        self.out = nn.Linear(E, 3)

    def forward(self, x, padding, mask):
        return self.out(self.enc(self.inp(x), mask=mask, src_key_padding_mask=padding))


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (sequence first), masks on every attention."""

    def __init__(self, **kw):
        super().__init__()
        self.inp = nn.Linear(6, E)
        self.tf = nn.Transformer(E, HEADS, 1, 2, 32, dropout=0.0, **kw)
        self.out = nn.Linear(E, 3)

    def forward(self, x, padding, mask):
        h = self.inp(x).transpose(0, 1)
        y = self.tf(h, h[:-1], tgt_mask=mask[:-1, :-1], src_key_padding_mask=padding,
                    memory_key_padding_mask=padding, tgt_is_causal=True)
        return self.out(y.transpose(0, 1))


class DecoderLayer(nn.Module):
    """A bare ``nn.TransformerDecoderLayer`` (pre-norm, gelu) on a memory made in the model."""

    def __init__(self):
        super().__init__()
        self.inp, self.mem = nn.Linear(6, E), nn.Linear(6, E)
        self.layer = nn.TransformerDecoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True,
                                                norm_first=True, activation="gelu")
        self.out = nn.Linear(E, 3)

    def forward(self, x, padding, mask):
        return self.out(self.layer(self.inp(x), self.mem(x), tgt_mask=mask,
                                   memory_key_padding_mask=padding))


TF_CASES = {
    "encoder_post_norm_relu": lambda: Encoder(),
    "encoder_pre_norm_gelu": lambda: Encoder(norm_first=True, activation="gelu"),
    "encoder_callable_activation": lambda: Encoder(activation=nn.SiLU()),
    "transformer_seq_first": lambda: Seq2Seq(),
    "transformer_pre_norm_functional_gelu": lambda: Seq2Seq(norm_first=True, activation=F.gelu),
    "decoder_layer": lambda: DecoderLayer(),
}


@pytest.mark.parametrize("case", list(TF_CASES))
def test_transformer_modules_prune_heads_and_neurons_exactly(case):
    torch.manual_seed(0)
    m = randomize_(TF_CASES[case]()).double().eval()
    inputs = (torch.randn(B, T, 6, dtype=torch.float64), kpm(), causal())
    graph_equals_module(m, inputs)
    pruner = sp.Pruner(m, inputs, ratio=0.5)
    graph = pruner.graph
    assert graph.head_groups()
    assert not any(p.qualname.endswith("norm1.weight") for g in graph.groups() for p in g.params)
    plan = heads_and_neurons_plan(graph)
    pruned = assert_oracle(pruner, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(*inputs), zeroed_reference(m, plan)(*inputs))
    if case in ("encoder_pre_norm_gelu", "transformer_seq_first"):
        assert_rule(m, inputs, ratio=0.5, onnx=True)


def test_nested_tensor_fast_path_agrees_on_the_positions_it_does_not_pad():
    torch.manual_seed(0)
    m = Encoder(nested=True).double().eval()
    inputs = (torch.randn(B, T, 6, dtype=torch.float64), kpm(), None)
    g = sp.trace(m, inputs)
    with torch.no_grad():
        got, want = g.graph_module(*inputs), m(*inputs)  # the fast path: nested tensors
    keep = ~kpm()
    torch.testing.assert_close(got[keep], want[keep])
    assert torch.equal(want[~keep], m.out.bias.expand_as(want[~keep]))  # zeros went to `out`
    pruned = sp.prune(m, inputs, ratio=0.5)
    assert pruned(*inputs).shape == want.shape


def test_a_leaf_transformer_stays_frozen_with_the_reason():
    m = Encoder().eval()
    inputs = (torch.randn(B, T, 6), kpm(), causal())
    g = sp.trace(m, inputs, leaf_modules=[nn.TransformerEncoder])
    assert any("kept whole" in e.reason for e in g.frozen())
    assert not g.head_groups()


# --- a model: a small text classifier ----------------------------------------------------------

class TextClassifier(nn.Module):
    """Embedding -> nn.TransformerEncoder (2 layers, padding mask) -> mean over tokens -> Linear."""

    def __init__(self, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, E)
        layer = nn.TransformerEncoderLayer(E, HEADS, 64, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cls = nn.Linear(E, 4)

    def forward(self, ids, padding):
        return self.cls(self.enc(self.emb(ids), src_key_padding_mask=padding).mean(1))


def test_a_text_classifier_prunes_half_its_heads_and_neurons():
    from structprune.macs import count_macs

    torch.manual_seed(0)
    m = TextClassifier().double().eval()
    ids = torch.randint(0, 50, (B, T))
    inputs = (ids, kpm())
    pruned = assert_rule(m, inputs, ratio=0.5)  # oracle, zero ratio, ONNX, save/load
    weights = dict(pruned.named_parameters())
    for i in range(2):
        assert weights[f"enc.layers.{i}.self_attn.in_proj_weight"].shape == (3 * E // 2, E)
        assert weights[f"enc.layers.{i}.linear1.weight"].shape == (32, E)
    before, after = count_macs(sp.trace(m, inputs)), count_macs(sp.trace(pruned, inputs))
    assert after < 0.7 * before, (before, after)
    ids2, pad2 = torch.randint(0, 50, (3, 9)), torch.zeros(3, 9, dtype=torch.bool)
    assert pruned(ids2, pad2).shape == (3, 4)  # another batch and length
    m.train()  # dropout 0.1: the graph still traces, in the training mode
    assert sp.prune(m, inputs, ratio=0.5)(*inputs).shape == (B, 4)
