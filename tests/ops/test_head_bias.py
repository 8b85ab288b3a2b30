"""A per-head attention bias is part of its head: scores ``q @ k.T`` of shape ``(B, H, L, S)``
plus a bias with a head dim, or an ``attn_mask`` with one.

Forms, as real models write them: Swin/BEiT's relative position table
``table[index.view(-1)].view(L, L, H).permute(2, 0, 1)`` (a ``[(2W-1)^2, H]`` parameter gathered
by a buffer), T5's ``Embedding(num_buckets, H)`` of a bucket index ``.permute([2, 0, 1])``,
TinyViT/LeViT's ``biases[:, idx]`` (a ``[H, offsets]`` parameter), a bias made by a small MLP
(timm's ``RelPosMlp``) and an additive ``attn_mask`` of SDPA. Dropping a head drops its q/k/v
rows, its output-projection columns and its column (or row) of the table; each test compares
with that network written by hand from slices, under fx and under the ``torch.export`` capture.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import assert_rule, randomize_

from .helpers import reader

D = torch.float64
N, E, H = 9, 8, 4  # tokens (a 3x3 window), width, heads of 2 channels


def _swin_index(w=3):
    """Swin's relative position index of a ``w x w`` window: ``[w*w, w*w]`` into a
    ``(2w-1)^2``-row table."""
    c = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


class BiasedAttention(nn.Module):
    """Multi-head self-attention whose scores get a per-head bias of kind ``kind``."""

    def __init__(self, kind, sdpa=False, export=False):
        super().__init__()
        self.kind, self.sdpa, self.export = kind, sdpa, export
        self.qkv, self.proj = nn.Linear(E, 3 * E), nn.Linear(E, E)
        if kind == "swin":
            self.table = nn.Parameter(torch.randn(25, H))
            self.register_buffer("index", _swin_index())
        elif kind == "t5":
            self.rel = nn.Embedding(16, H)
            self.register_buffer("buckets", torch.randint(0, 16, (N, N)))
        elif kind == "tinyvit":
            self.biases = nn.Parameter(torch.randn(H, 25))
            self.register_buffer("idx", _swin_index())
        elif kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, H))
            self.register_buffer("coords", torch.randn(N, N, 2))

    def bias(self):
        if self.kind == "swin":
            b = self.table[self.index.view(-1)].view(N, N, -1)
            return b.permute(2, 0, 1).contiguous().unsqueeze(0)
        if self.kind == "t5":
            return self.rel(self.buckets).permute([2, 0, 1]).unsqueeze(0)
        if self.kind == "tinyvit":
            return self.biases[:, self.idx]
        return self.mlp(self.coords).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x):
        if self.export and x.dim() > 8:
            x = x * 2
        b, n, e = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, e // H).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias())
        else:
            o = ((q @ k.transpose(-2, -1)) * 0.5 + self.bias()).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, e))


def by_hand(m, x, heads):
    """The attention with only ``heads`` kept, from slices of ``m``'s tensors."""
    hs = torch.tensor(heads)
    ch = torch.tensor([h * 2 + d for h in heads for d in range(2)])
    rows = torch.cat([part * E + ch for part in range(3)])
    b, n, _ = x.shape
    q, k, v = F.linear(x, m.qkv.weight[rows], m.qkv.bias[rows]).reshape(
        b, n, 3, len(heads), 2).permute(2, 0, 3, 1, 4)
    if m.kind == "swin":
        bias = m.table[m.index.view(-1)][:, hs].view(N, N, -1).permute(2, 0, 1)
    elif m.kind == "t5":
        bias = F.embedding(m.buckets, m.rel.weight[:, hs]).permute(2, 0, 1)
    elif m.kind == "tinyvit":
        bias = m.biases[hs][:, m.idx]
    else:
        hidden = F.relu(F.linear(m.coords, m.mlp[0].weight, m.mlp[0].bias))
        bias = F.linear(hidden, m.mlp[2].weight[hs], m.mlp[2].bias[hs]).permute(2, 0, 1)
    if m.sdpa:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
    else:
        o = ((q @ k.transpose(-2, -1)) * 0.5 + bias).softmax(-1) @ v
    return F.linear(o.transpose(1, 2).reshape(b, n, -1), m.proj.weight[:, ch], m.proj.bias)


TABLE = {"swin": ("table", 1), "t5": ("rel.weight", 1), "tinyvit": ("biases", 0),
         "mlp": ("mlp.2.weight", 0)}


@pytest.mark.parametrize("kind,sdpa,export", [
    ("swin", False, False), ("swin", True, False), ("swin", False, True), ("swin", True, True),
    ("t5", False, False), ("t5", True, True), ("tinyvit", False, False),
    ("tinyvit", False, True), ("mlp", True, False)])
def test_a_pruned_head_drops_its_bias(kind, sdpa, export):
    torch.manual_seed(0)
    m = randomize_(BiasedAttention(kind, sdpa, export)).double().eval()
    x = torch.randn(2, N, E, dtype=D)
    graph = sp.trace(m, x)
    assert graph.graph_module.meta.get("structprune_capture", "fx") == ("export" if export
                                                                        else "fx")
    heads = next(g for g in graph.groups() if any(p.qualname == "qkv.weight" for p in g.params))
    assert heads.num_units == H and TABLE[kind] in {(p.qualname, p.space.dim)
                                                    for p in heads.params}
    pruned = assert_rule(m, x, drop={reader(graph, "qkv"): [2, 7]},  # q of heads 1 and 3
                         onnx=kind in ("swin", "t5") and not export, save_load=not export)
    torch.testing.assert_close(pruned(x), by_hand(m, x, [0, 2]))
    name, dim = TABLE[kind]
    assert pruned.get_parameter(name).shape[dim] == 2
    x2 = torch.randn(3, N, E, dtype=D)  # another batch
    torch.testing.assert_close(pruned(x2), by_hand(m, x2, [0, 2]))


class MaskedSDPA(nn.Module):
    """An additive ``(B, H, L, S)`` mask computed per head from the tokens (a gate per head),
    passed to SDPA as ``attn_mask``: its head dim goes with the heads."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.gate = nn.Linear(E, 3 * E), nn.Linear(E, E), nn.Linear(E, H)

    def forward(self, x):
        b, n, e = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, e // H).permute(2, 0, 3, 1, 4)
        g = self.gate(x).transpose(1, 2)  # (B, H, L)
        mask = g[:, :, :, None] * g[:, :, None, :]  # (B, H, L, S)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(b, n, e))


def test_a_per_head_attn_mask_goes_with_its_head():
    torch.manual_seed(0)
    m = MaskedSDPA().double().eval()
    x = torch.randn(2, N, E, dtype=D)
    graph = sp.trace(m, x)
    heads = next(g for g in graph.groups() if any(p.qualname == "qkv.weight" for p in g.params))
    assert ("gate.weight", 0) in {(p.qualname, p.space.dim) for p in heads.params}
    pruned = assert_rule(m, x, drop={"qkv": [0]}, onnx=False, save_load=False)  # head 0
    hs, ch = torch.tensor([1, 2, 3]), torch.arange(2, 8)
    rows = torch.cat([part * E + ch for part in range(3)])
    b, n, _ = x.shape
    q, k, v = F.linear(x, m.qkv.weight[rows], m.qkv.bias[rows]).reshape(
        b, n, 3, 3, 2).permute(2, 0, 3, 1, 4)
    g = F.linear(x, m.gate.weight[hs], m.gate.bias[hs]).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=g[:, :, :, None] * g[:, :, None, :])
    want = F.linear(o.transpose(1, 2).reshape(b, n, 6), m.proj.weight[:, ch], m.proj.bias)
    torch.testing.assert_close(pruned(x), want)
