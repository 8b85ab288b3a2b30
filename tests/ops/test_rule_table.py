"""Every registered op rule, exercised inside a small network and checked by ``assert_rule``
(zero-ratio identity, masked oracle in float64, exact parameter shapes, ONNX parity, save/load).

``test_every_rule_is_covered`` fails when a rule is added to the registry without a case here.
"""
import typing

import pytest

import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.rules import module_rule, registry
from structprune.testing import assert_rule, randomize_


class Net(nn.Module):
    """conv(3->8) -> op -> a consumer; the op's rule decides what of the 8 channels is prunable."""

    def __init__(self, op, consumer=None, c=8, extra=None):
        super().__init__()
        self.pre = nn.Conv2d(3, c, 3, padding=1)
        self.op = op
        self.extra = extra
        self.post = consumer if consumer is not None else nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.post(self.op(self, self.pre(x)))


def img(shape=(2, 3, 6, 6)):
    return torch.randn(*shape, dtype=torch.float64)


class Seq(nn.Module):
    def __init__(self, *mods):
        super().__init__()
        self.m = nn.Sequential(*mods)

    def forward(self, x):
        return self.m(x)


class Tokens(nn.Module):
    """Linear(6->8) on [B, T, 6] tokens -> op -> Linear(... -> 3)."""

    def __init__(self, op, out_in=8):
        super().__init__()
        self.pre, self.op, self.post = nn.Linear(6, 8), op, nn.Linear(out_in, 3)

    def forward(self, x):
        return self.post(self.op(self, self.pre(x)))


def tok():
    return torch.randn(2, 5, 6, dtype=torch.float64)


_SRC, _DST = [0, 1, 2, 3, 4, 5, 6, 0, 3], [1, 2, 3, 4, 5, 6, 0, 4, 0]


def _message_passing(s, x):
    """Gathers (``x[src]``, ``index_select``, ``aten.index``, ``gather``) and scatters
    (``scatter_add_``, ``scatter_reduce``, ``index_add``) on a 7-node graph."""
    src, dst = torch.tensor(_SRC), torch.tensor(_DST)
    msg = x[src] * x.index_select(0, dst).sigmoid()
    idx = dst.view(-1, 1).expand_as(msg)
    out = x.new_zeros(x.shape).scatter_add_(0, idx, msg)
    out = out + torch.scatter_reduce(torch.zeros_like(x), 0, idx, msg, "amax")
    out = out + torch.ops.aten.index.Tensor(out, [6 - torch.arange(x.shape[0])])
    # unique rows: torch's TorchScript ONNX exporter overwrites repeated index_add rows
    return torch.index_add(out, 0, torch.tensor([2, 0, 1]),
                           torch.gather(x, 0, src[:3].view(-1, 1).expand(3, x.shape[1])))


class Cells(nn.Module):
    """Linear -> GRU cell -> LSTM cell (the GRU state as both of its states) -> Linear."""

    def __init__(self):
        super().__init__()
        self.pre, self.gru, self.lstm = nn.Linear(6, 8), nn.GRUCell(8, 8), nn.LSTMCell(8, 8)
        self.post = nn.Linear(8, 3)

    def forward(self, x):
        a = self.pre(x)
        h = self.gru(a)
        h2, c2 = self.lstm(a, (h, h))
        return self.post(h2 + c2)


class AtenCell(Cells):
    """The GRU cell as ``aten.gru_cell`` on the module's weights (a torch.export graph's op)."""

    def forward(self, x):
        a, g = self.pre(x), self.gru
        h = torch.ops.aten.gru_cell.default(a, a.new_zeros(a.shape[0], 8), g.weight_ih,
                                            g.weight_hh, g.bias_ih, g.bias_hh)
        return self.post(h)


class AtenLSTM(nn.Module):
    """A whole bidirectional LSTM as ``aten.lstm.input``: its input features prune."""

    def __init__(self):
        super().__init__()
        self.pre, self.lstm = nn.Linear(6, 8), nn.LSTM(8, 4, bidirectional=True, batch_first=True)
        self.post = nn.Linear(8, 3)

    def forward(self, x):
        a = self.pre(x)
        h0 = a.new_zeros(2, a.shape[0], 4)
        return self.post(torch.ops.aten.lstm.input(a, [h0, h0], self.lstm._flat_weights, True, 1,
                                                   0.0, False, True, True)[0])


class RNNs(nn.Module):
    """Whole recurrent modules (``ops/recurrent.py``): a 2-layer bidirectional LSTM, a GRU on
    an initial state made by a Linear, and a ReLU RNN."""

    def __init__(self):
        super().__init__()
        self.pre, self.h0 = nn.Linear(6, 8), nn.Linear(6, 4)
        self.lstm = nn.LSTM(8, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(8, 4, batch_first=True)
        self.rnn = nn.RNN(4, 5, nonlinearity="relu", batch_first=True)
        self.post = nn.Linear(5, 3)

    def forward(self, x):
        a = self.pre(x)
        y, (h, c) = self.lstm(a)
        g, _ = self.gru(y, self.h0(x.mean(1)).unsqueeze(0))
        return self.post(self.rnn(g)[0])


class MaskedEncoder(nn.Module):
    """``nn.TransformerEncoder`` (``ops/transformer.py``) on a causal mask built in forward,
    and an ``nn.MultiheadAttention`` with a per-head 3-D mask (``mha_mask``)."""

    def __init__(self):
        super().__init__()
        self.pre, self.bias = nn.Linear(6, 8), nn.Linear(6, 2)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
            enable_nested_tensor=False)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.post = nn.Linear(8, 3)

    def forward(self, x):
        b, t, _ = x.shape
        causal = x.new_ones((t, t), dtype=torch.bool).triu(1)
        h = self.enc(self.pre(x), mask=causal)
        m = self.bias(x).transpose(1, 2).unsqueeze(-1).expand(b, 2, t, t).reshape(b * 2, t, t)
        return self.post(self.attn(h, h, h, attn_mask=m, need_weights=False)[0])


class Bags(nn.Module):
    """``nn.EmbeddingBag`` (mean, offsets) and ``F.embedding_bag`` (max) on one table."""

    def __init__(self):
        super().__init__()
        self.bag, self.lin = nn.EmbeddingBag(10, 8), nn.Linear(8, 3)

    def forward(self, ids):
        a = self.bag(ids.flatten(), torch.tensor([0, 3, 6]))
        return self.lin(F.relu(a + F.embedding_bag(ids[:, :3], self.bag.weight, mode="max")))


class _Logits(typing.NamedTuple):
    logits: torch.Tensor


class NamedTupleOut(nn.Module):
    """Branches on a size (so torch.export captures it) and returns a named tuple, which the
    exported graph rebuilds with ``build_output``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if x.shape[-1] > 2:
            x = x * 2.0
        return _Logits(self.b(F.relu(self.a(x))))


CASES = {
    "model_output_named_tuple": (NamedTupleOut, img),
    # elementwise, activations, broadcasting
    "relu_module": (lambda: Seq(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(8, 2, 1)), img),
    "functional_unary": (lambda: Net(lambda s, x: torch.sigmoid(F.gelu(x)).clone().contiguous()), img),
    "type_as": (lambda: Net(lambda s, x: x.type_as(x) * 2), img),
    "add_mul_broadcast_se": (lambda: Net(lambda s, x: x * torch.sigmoid(x.mean((2, 3), keepdim=True)) + 1.0), img),
    "prelu_per_channel": (lambda: Seq(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 2, 1)), img),
    "reduce_sum_max_keep_channels": (lambda: Net(lambda s, x: x.amax(dim=3, keepdim=True) + x.sum(2, keepdim=True)), img),
    "softmax_over_spatial": (lambda: Net(lambda s, x: F.softmax(x, dim=-1)), img),
    # conv family
    "conv1d": (lambda: Seq(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 2, 1)), lambda: img((2, 3, 9))),
    "conv3d": (lambda: Seq(nn.Conv3d(3, 6, 2), nn.ReLU(), nn.Conv3d(6, 2, 1)), lambda: img((1, 3, 4, 4, 4))),
    "conv_transpose1d": (lambda: Seq(nn.Conv1d(3, 6, 1), nn.ConvTranspose1d(6, 4, 2, stride=2), nn.Conv1d(4, 2, 1)), lambda: img((2, 3, 5))),
    "functional_conv": (lambda: Net(lambda s, x: F.conv2d(x, s.extra.weight, s.extra.bias, 1, 1, 1, 1),
                                    extra=nn.Conv2d(8, 8, 3)), img),
    # linear family
    "linear_tokens": (lambda: Tokens(lambda s, x: F.relu(x)), tok),
    "functional_linear": (lambda: Tokens(lambda s, x: x, out_in=8), tok),
    "embedding": (lambda: EmbedNet(), lambda: torch.randint(0, 10, (2, 5))),
    "matmul_bmm_mm": (lambda: Tokens(lambda s, x: torch.bmm(x, x.transpose(1, 2)) @ x), tok),
    "einsum": (lambda: Tokens(lambda s, x: torch.einsum("btc,bsc->bts", x, x).softmax(-1) @ x), tok),
    # norms
    "batchnorm1d_tokens": (lambda: Seq(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), lambda: img((4, 6))),
    "functional_batchnorm": (lambda: Net(lambda s, x: F.batch_norm(x, s.extra.running_mean, s.extra.running_var,
                                                                   s.extra.weight, s.extra.bias), extra=nn.BatchNorm2d(8)), img),
    "group_norm": (lambda: Seq(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.Conv2d(8, 2, 1)), img),
    "functional_embedding": (lambda: FEmbedNet(), lambda: torch.randint(0, 10, (2, 5))),
    "instance_norm": (lambda: Seq(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True), nn.Conv2d(8, 2, 1)), img),
    "functional_group_norm": (lambda: Net(lambda s, x: F.group_norm(x, 4, s.extra.weight, s.extra.bias), extra=nn.GroupNorm(4, 8)), img),
    "layernorm_channels_last": (lambda: Seq(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(),
                                            nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 3)), tok),
    # pooling, resampling, padding, shuffles
    "pool1d": (lambda: Seq(nn.Conv1d(3, 8, 1), nn.MaxPool1d(2), nn.AdaptiveAvgPool1d(2), nn.Conv1d(8, 2, 1)), lambda: img((2, 3, 8))),
    "pool2d": (lambda: Seq(nn.Conv2d(3, 8, 1), nn.MaxPool2d(2), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 2, 1)), img),
    "pool3d": (lambda: Seq(nn.Conv3d(3, 8, 1), nn.MaxPool3d(2), nn.Conv3d(8, 2, 1)), lambda: img((1, 3, 4, 4, 4))),
    "interpolate": (lambda: Net(lambda s, x: F.interpolate(x, scale_factor=2, mode="bilinear") + 0), img),
    "pad": (lambda: Net(lambda s, x: F.pad(x, (1, 1, 2, 0))), img),
    "pixel_shuffle": (lambda: Seq(nn.Conv2d(3, 16, 1), nn.PixelShuffle(2), nn.Conv2d(4, 2, 1)), img),
    "channel_shuffle": (lambda: Seq(nn.Conv2d(3, 8, 1), nn.ChannelShuffle(2), nn.Conv2d(8, 2, 1)), img),
    # shape ops
    "view_reshape_literal": (lambda: Net(lambda s, x: x.view(x.size(0), 8, -1).reshape(x.size(0), 8, 6, 6)), img),
    "flatten_linear": (lambda: Net(lambda s, x: torch.flatten(x, 1), consumer=nn.Linear(8 * 36, 3)), img),
    "unflatten_squeeze": (lambda: Net(lambda s, x: x.flatten(2).unflatten(2, (6, 6)).unsqueeze(0).squeeze(0)), img),
    "permute_transpose": (lambda: Net(lambda s, x: x.permute(0, 2, 3, 1).transpose(1, 2).permute(0, 3, 2, 1)), img),
    "getattr_shape_T": (lambda: Tokens(lambda s, x: (x.mT.mT + x.shape[0])), tok),
    "size_queries": (lambda: Net(lambda s, x: x.view(x.size(0), x.size(1), x.dim() + 2, -1)), img),
    "cat_stack": (lambda: Net(lambda s, x: torch.cat([x, x * 2], 1)[:, :8] + torch.stack([x, x], 0).sum(0)), img),
    "split_unbind": (lambda: Net(_split_unbind), img),
    "getitem_slices": (lambda: Net(lambda s, x: x[:, 2:6, ..., None][..., 0] * x[:, 4:8],
                                   consumer=nn.Conv2d(4, 4, 1)), img),
    "new_zeros_ones_full": (lambda: Net(lambda s, x: x * x.new_ones((x.size(0), 8, 6, 6)) + x.new_zeros(x.size(0), 8, 6, 6)
                                        + x.new_full((x.size(0), 8, 1, 1), 0.5)), img),
    "expand_repeat": (lambda: Net(lambda s, x: x.mean((2, 3), keepdim=True).expand(-1, -1, 6, 6) + x.repeat(1, 1, 1, 1)), img),
    # message passing: gather onto edges, scatter back onto nodes (ops/scatter.py)
    "gather_scatter_nodes": (lambda: Tokens(_message_passing), lambda: img((7, 6))),
    # recurrent cells (ops/recurrent.py)
    "gru_lstm_cells": (Cells, lambda: img((3, 6))),
    "aten_gru_cell": (AtenCell, lambda: img((3, 6))),
    "aten_lstm_whole": (AtenLSTM, lambda: img((2, 3, 6))),
    "lstm_gru_rnn_modules": (RNNs, tok),
    "transformer_encoder_mha_masks": (MaskedEncoder, tok),
    "embedding_bags": (Bags, lambda: torch.randint(0, 10, (3, 3))),
    # attention
    "sdpa_heads": (lambda: Heads(sdpa=True), tok),
    "mha": (lambda: MHANet(), tok),
    "mha_kept_whole": (lambda: MHAWholeNet(), tok),  # add_zero_attn: a frozen leaf, with the reason
    # ATen overloads (graphs captured by torch.export) that have rules of their own
    "aten_convolution_grouped": (lambda: Net(lambda s, x: aten.convolution.default(
        x, s.extra.weight, s.extra.bias, [1, 1], [1, 1], [1, 1], False, [0, 0], 2),
        extra=nn.Conv2d(8, 8, 3, groups=2)), img),
    "aten_conv_transpose": (lambda: Net(lambda s, x: aten.conv_transpose2d.input(
        x, s.extra.weight, s.extra.bias, [1, 1], [1, 1]), extra=nn.ConvTranspose2d(8, 8, 3)), img),
    "aten_batch_norms": (lambda: Net(lambda s, x: aten.batch_norm.default(
        x, s.extra.weight, s.extra.bias, s.extra.running_mean, s.extra.running_var, False, 0.1,
        1e-5, False) + aten._native_batch_norm_legit_no_training.default(
        x, s.extra.weight, s.extra.bias, s.extra.running_mean, s.extra.running_var, 0.1, 1e-5)[0],
        extra=nn.BatchNorm2d(8)), img),
    "aten_prelu": (lambda: Net(lambda s, x: aten.prelu.default(x, s.extra.weight), extra=nn.PReLU(8)), img),
    "aten_addmm_embedding": (lambda: AtenEmbedAddmm(), lambda: torch.randint(0, 10, (2, 5))),
    "aten_slice_narrow_select": (lambda: Net(lambda s, x: aten.slice.Tensor(x, 1, 2, 6) * aten.narrow.default(x, 1, 4, 4)
                                             + aten.select.int(x, 1, 5).unsqueeze(1), consumer=nn.Conv2d(4, 4, 1)), img),
    "aten_flip_roll_index_select": (lambda: Net(lambda s, x: aten.flip.default(x, [3]) + aten.roll.default(x, [1], [2])
                                                + aten.index_select.default(x, 3, torch.tensor([5, 4, 3, 2, 1, 0]))), img),
}

aten = torch.ops.aten


class AtenEmbedAddmm(nn.Module):
    """``aten.embedding(weight, ids)`` then ``aten.addmm(bias, x, w.t())`` (a linear layer)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.out = nn.Embedding(10, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, ids):
        h = aten.embedding.default(self.emb.weight, ids).reshape(10, 8)
        return self.out(F.relu(aten.addmm.default(self.lin.bias, h, self.lin.weight.t())))


def _split_unbind(s, x):
    a, b = x.split([4, 4], dim=1)  # swapping halves pairs channel i with i+4
    u0, u1 = x.unbind(0)
    return torch.cat([b, a], 1) + torch.stack([u0, u1], 0)


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.lin(F.relu(self.emb(ids)))


class FEmbedNet(EmbedNet):
    def forward(self, ids):
        return self.lin(F.relu(F.embedding(ids, self.emb.weight)))


class Heads(nn.Module):
    def __init__(self, sdpa=True):
        super().__init__()
        self.qkv, self.proj = nn.Linear(6, 24), nn.Linear(8, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, 4, 2).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 8))


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(6, 8), nn.MultiheadAttention(8, 4, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h)[0])


class MHAWholeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.mid = nn.Linear(6, 8), nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True, add_zero_attn=True)

    def forward(self, x):
        h = self.mid(torch.relu(self.inp(x)))
        return self.attn(h, h, h)[0]


def _build(name):
    make, inp = CASES[name]
    torch.manual_seed(0)
    m = make()
    return randomize_(m).double().eval(), inp()


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_case(name):
    model, x = _build(name)
    graph = sp.trace(model, x)
    assert graph.groups(), f"{name}: nothing prunable; frozen: {graph.frozen()}"
    assert_rule(model, x, ratio=0.5, importance="random", onnx=True)


def test_layernorm_freezes_its_dim_only():
    model, x = _build("layernorm_channels_last")
    graph = sp.trace(model, x)
    assert any("LayerNorm normalises" in e.reason for e in graph.frozen())
    for g in graph.groups():
        assert not any(m.module in ("m.1", "m.5") for m in g.params)  # the LayerNorms
    assert any(any(m.module == "m.2" for m in g.params) for g in graph.groups())  # the MLP width


def test_every_rule_is_covered():
    used = set()
    for name in CASES:
        model, x = _build(name)
        graph = sp.trace(model, x)
        used |= {type(r).__name__ for r in graph.node_rules.values()}
        # a rule that decomposes its module (nn.MultiheadAttention) shows as the ops it traced
        calls = {n.target for n in graph.graph_module.graph.nodes if n.op == "call_module"}
        used |= {type(module_rule(m, graph.rules)).__name__ for path, m in model.named_modules()
                 if getattr(module_rule(m, graph.rules), "decomposes", False)
                 and path not in calls}
    defined = {type(r).__name__ for r in registry().values()}
    missing = defined - used - {"Frozen"}
    assert not missing, f"rules without a test case: {sorted(missing)}"


class TensorIndex(nn.Module):
    """``table[idx]`` with a tensor index (relative position bias tables): a gather of rows."""

    def __init__(self):
        super().__init__()
        self.conv, self.table = nn.Conv2d(3, 8, 1), nn.Parameter(torch.randn(5, 8))
        self.mid = nn.Conv2d(8, 8, 1)
        self.register_buffer("idx", torch.tensor([0, 2, 4, 1, 3, 0]))
        self.post = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        bias = self.table[self.idx]  # [6, 8]
        return self.post(self.mid(F.relu(self.conv(x))) + bias.t().reshape(1, 8, 6, 1))


def test_tensor_indexing_gathers_rows_and_maps_the_channels():
    """The gathered rows stay whole (the index values address them); the table's columns are
    the channels ``mid`` adds it to, so they prune with ``mid``."""
    torch.manual_seed(0)
    model = randomize_(TensorIndex()).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    graph = sp.trace(model, x)
    dims = {(m.qualname, m.space.dim) for g in graph.groups() for m in g.params}
    assert ("table", 1) in dims and ("table", 0) not in dims and ("conv.weight", 0) in dims
    assert_rule(model, x, ratio=0.5, importance="random", onnx=False)
