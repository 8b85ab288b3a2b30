"""Hand-built references for the exact reductions and repeats (``ReduceRule``, ``RepeatRule``).

- ``sum`` over a pruned dim: zeroing equals removing, in every form (method, ``torch.sum`` with a
  dim list and ``keepdim``, ``aten.sum.dim_IntList``, ``aten.sum.default``) and capture.
- ``mean`` over a pruned dim: the pruned graph divides the kept entries' sum by the original
  count (an inserted ``mul``), so a hand-written RMSNorm (``x.pow(2).mean(-1)``, Llama) prunes
  the width it normalises exactly; ``var``/``std``/``nanmean`` stay frozen with the op named.
- ``repeat``/``tile``/``repeat_interleave`` along a pruned dim: unit ``i`` is ``i + c*n`` of every
  copy (``repeat``) or ``i*k .. i*k+k-1`` (``repeat_interleave``); GQA's ``repeat_kv`` keeps the
  query heads of a KV head together.

Each test prunes named units with :func:`assert_rule` (zero-ratio identity, masked oracle,
parameter shapes, ONNX where asked, save/load), then recomputes the pruned network by hand from
slices of the original weights. ``Exported`` variants cannot be traced by fx (a shape test in
``forward``) and go through the ``torch.export`` capture, whose graphs call the ATen overloads.
"""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import assert_rule, randomize_

from .helpers import reader

aten = torch.ops.aten
D = torch.float64


def f64(m):
    return randomize_(m).double().eval()


def tokens(b=2, t=5):
    return torch.randn(b, t, 6, dtype=D)


def others(n, *drop):
    return torch.tensor([i for i in range(n) if i not in drop])


class Wrap(nn.Module):
    """``post(fn(self, pre(x)))`` on ``[B, T, 6]`` tokens; ``pre`` makes ``c`` channels.
    ``export=True`` adds a shape test that fx cannot trace (the ``torch.export`` capture)."""

    def __init__(self, fn, c=8, c_post=None, export=False):
        super().__init__()
        self.pre = nn.Linear(6, c)
        self.post = nn.Linear(c if c_post is None else c_post, 3)
        self.fn, self.export = fn, export

    def forward(self, x):
        if self.export and x.dim() > 8:
            x = x * 2
        return self.post(self.fn(self, self.pre(x)))


def pre_k(m, x, k):
    return F.linear(x, m.pre.weight[k], m.pre.bias[k])


def captured(m, x):
    return sp.trace(m, x).graph_module.meta.get("structprune_capture", "fx")


# ------------------------------------------------------------------------------------ sum
SUMS = {
    "method": lambda s, h: h * h.sum(-1, keepdim=True),
    "torch_sum_list_keepdim": lambda s, h: h * torch.sum(h, dim=[-1], keepdim=True),
    "aten_sum_dim_IntList": lambda s, h: h * aten.sum.dim_IntList(h, [2], True),
    "aten_sum_default": lambda s, h: h * aten.sum.default(h),
    "all_dims": lambda s, h: h * h.sum(),
    "axis_keyword": lambda s, h: h * torch.sum(h, axis=-1, keepdim=True),
}


#: Forms also run through the export capture (each becomes one of the ATen overloads).
SUMS_EXPORTED = ("method", "all_dims")  # aten.sum.dim_IntList, aten.sum.default


@pytest.mark.parametrize("form,export", [(f, False) for f in sorted(SUMS)]
                         + [(f, True) for f in SUMS_EXPORTED])
def test_sum_over_the_pruned_dim_is_the_sum_of_the_kept_entries(form, export):
    fn = SUMS[form]
    m, x = f64(Wrap(fn, export=export)), tokens()
    assert captured(m, x) == ("export" if export else "fx")
    pruned = assert_rule(m, x, drop={reader(sp.trace(m, x), "pre"): [1, 6]}, onnx=form == "method" and not export,
                         save_load=form == "method")
    k = others(8, 1, 6)
    want = F.linear(fn(m, pre_k(m, x, k)), m.post.weight[:, k], m.post.bias)
    torch.testing.assert_close(pruned(x), want)


def test_sum_of_a_weight_alone_keeps_the_reduced_dim():
    """A weight's own sum (weight standardisation) would change with its entries: frozen."""
    class WeightSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.post = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            w = self.post.weight / self.post.weight.abs().sum(1, keepdim=True)
            return F.linear(self.pre(x), w)

    graph = sp.trace(f64(WeightSum()), tokens())
    assert not graph.groups()
    assert any("computed from parameters alone" in e.reason for e in graph.frozen())


@pytest.mark.parametrize("p", [2.0, 1.0, float("inf")])
def test_normalize_over_the_pruned_dim_is_exact(p):
    """``F.normalize`` (fx keeps it one call): zeros leave a p-norm with ``p >= 0`` unchanged."""
    m, x = f64(Wrap(lambda s, h: F.normalize(h, p, -1))), tokens()
    pruned = assert_rule(m, x, drop={"pre": [1, 6]}, onnx=p == 2.0, save_load=False)
    k = others(8, 1, 6)
    want = F.linear(F.normalize(pre_k(m, x, k), p, -1), m.post.weight[:, k], m.post.bias)
    torch.testing.assert_close(pruned(x), want)


def test_normalize_of_a_weight_or_with_a_negative_p_keeps_the_dim():
    class CosineHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.w = nn.Linear(6, 8), nn.Parameter(torch.randn(3, 8))

        def forward(self, x):  # a cosine classifier: the weight's rows normalised
            return F.linear(self.pre(x), F.normalize(self.w, dim=1))

    graph = sp.trace(f64(CosineHead()), tokens())
    assert not graph.groups()
    assert any("norm of a tensor computed from parameters alone" in e.reason
               for e in graph.frozen())
    graph = sp.trace(f64(Wrap(lambda s, h: F.normalize(h, -1.0, -1))), tokens())
    assert not graph.groups()
    assert any("normalize with p=-1.0" in e.reason for e in graph.frozen())


@pytest.mark.parametrize("export", [False, True])
def test_cumsum_over_the_pruned_dim_sums_the_kept_entries(export):
    m, x = f64(Wrap(lambda s, h: h.cumsum(-1), export=export)), tokens()
    pruned = assert_rule(m, x, drop={reader(sp.trace(m, x), "pre"): [0, 4]}, onnx=not export,
                         save_load=False)
    k = others(8, 0, 4)
    want = F.linear(pre_k(m, x, k).cumsum(-1), m.post.weight[:, k], m.post.bias)
    torch.testing.assert_close(pruned(x), want)


# ----------------------------------------------------------------------------------- mean
MEANS = {
    "method": lambda s, h: h * h.mean(-1, keepdim=True),
    "torch_mean_list_keepdim": lambda s, h: h * torch.mean(h, dim=[-1], keepdim=True),
    "aten_mean_dim": lambda s, h: h * aten.mean.dim(h, [2], True),
    "aten_mean_default": lambda s, h: h * aten.mean.default(h),
    "all_dims": lambda s, h: h * h.mean(),
    "two_dims": lambda s, h: h * h.mean((1, 2), keepdim=True),
}
#: What each mean is by hand on the pruned width: the kept entries' sum over the original count.
MEANS_BY_HAND = {
    "method": lambda h, n: h * (h.sum(-1, keepdim=True) / n),
    "torch_mean_list_keepdim": lambda h, n: h * (h.sum(-1, keepdim=True) / n),
    "aten_mean_dim": lambda h, n: h * (h.sum(-1, keepdim=True) / n),
    "aten_mean_default": lambda h, n: h * (h.sum() / (h.shape[0] * h.shape[1] * n)),
    "all_dims": lambda h, n: h * (h.sum() / (h.shape[0] * h.shape[1] * n)),
    "two_dims": lambda h, n: h * (h.sum((1, 2), keepdim=True) / (h.shape[1] * n)),
}


MEANS_EXPORTED = ("method", "all_dims", "two_dims")  # aten.mean.dim, aten.mean.default


@pytest.mark.parametrize("form,export", [(f, False) for f in sorted(MEANS)]
                         + [(f, True) for f in MEANS_EXPORTED])
def test_mean_over_the_pruned_dim_divides_by_the_original_count(form, export):
    m, x = f64(Wrap(MEANS[form], export=export)), tokens()
    assert captured(m, x) == ("export" if export else "fx")
    pruned = assert_rule(m, x, drop={reader(sp.trace(m, x), "pre"): [0, 3, 4]},
                         onnx=form == "method" and not export,
                         save_load=form == "method")
    k = others(8, 0, 3, 4)
    want = F.linear(MEANS_BY_HAND[form](pre_k(m, x, k), 8), m.post.weight[:, k], m.post.bias)
    torch.testing.assert_close(pruned(x), want)
    # the rescaling is one inserted multiplication by 5/8 (kept / original channels)
    scales = [n.args[1] for n in pruned.graph.nodes
              if n.op == "call_function" and n.target in (aten.mul.Tensor, operator.mul)
              and isinstance(n.args[1], float)]
    assert scales == [5 / 8]


def test_mean_over_an_unpruned_dim_changes_nothing():
    """A mean over the tokens while the channels are pruned: no rescaling is inserted."""
    m, x = f64(Wrap(lambda s, h: h * h.mean(1, keepdim=True))), tokens()
    pruned = assert_rule(m, x, drop={"pre": [2]}, onnx=False, save_load=False)
    k = others(8, 2)
    h = pre_k(m, x, k)
    torch.testing.assert_close(pruned(x), F.linear(h * h.mean(1, keepdim=True),
                                                   m.post.weight[:, k], m.post.bias))
    assert type(pruned) is Wrap  # nothing rewritten: the user's class comes back


@pytest.mark.parametrize("op", ["var", "std", "nanmean"])
def test_reductions_a_mean_cannot_fix_keep_the_dim_and_name_the_op(op):
    """``var``/``std`` subtract a mean every entry shares, ``nanmean`` counts non-NaN entries:
    removing entries changes them, so the reduced dim stays whole with the op named."""
    m, x = f64(Wrap(lambda s, h: h * getattr(h, op)(-1, keepdim=True))), tokens()
    graph = sp.trace(m, x)
    assert not graph.groups()
    assert any(e.reason.startswith(f"{op} mixes the entries") for e in graph.frozen())


class HandRMSNorm(nn.Module):
    """Hugging Face Llama's RMSNorm as written: ``w * (x * rsqrt(mean(x^2) + eps))``."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


class TinyLM(nn.Module):
    """Embedding -> residual MLP block behind a hand-written RMSNorm -> RMSNorm -> LM head:
    the residual (hidden) width is normalised by a mean, as in Llama."""

    def __init__(self, vocab=11, d=8, ff=12, export=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.n1, self.n2 = HandRMSNorm(d), HandRMSNorm(d)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)
        self.head = nn.Linear(d, vocab)
        self.export = export

    def forward(self, ids):
        if self.export and ids.dim() > 8:
            ids = ids + 1
        h = self.emb(ids)
        h = h + self.down(F.silu(self.up(self.n1(h))))
        return self.head(self.n2(h))


def _rms_by_hand(x, w, d_orig, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / d_orig + eps))


@pytest.mark.parametrize("export", [False, True])
def test_hand_written_rms_norm_prunes_the_hidden_width_exactly(export):
    torch.manual_seed(0)
    m = TinyLM(export=export).double().eval()
    with torch.no_grad():
        for n in (m.n1, m.n2):
            n.weight.copy_(torch.rand(8, dtype=D) + 0.5)
    ids = torch.randint(0, 11, (2, 5))
    assert captured(m, ids) == ("export" if export else "fx")
    graph = sp.trace(m, ids, ignore=[m.head])
    hidden = [g for g in graph.groups() if any(p.qualname == "emb.weight" for p in g.params)]
    assert hidden and hidden[0].num_units == 8, graph.frozen()
    pruned = assert_rule(m, ids, drop={reader(sp.trace(m, ids), "emb"): [1, 5, 6]}, onnx=not export, save_load=not export)
    k, kf = others(8, 1, 5, 6), torch.arange(12)
    h = F.embedding(ids, m.emb.weight[:, k])
    u = F.linear(_rms_by_hand(h, m.n1.weight[k], 8), m.up.weight[:, k], m.up.bias)
    h = h + F.linear(F.silu(u), m.down.weight[k][:, kf], m.down.bias[k])
    want = F.linear(_rms_by_hand(h, m.n2.weight[k], 8), m.head.weight[:, k], m.head.bias)
    torch.testing.assert_close(pruned(ids), want)
    torch.testing.assert_close(pruned(ids[:, :3]), want[:, :3])  # causal-free: per token


def test_gat_with_mean_over_heads_prunes_whole_heads():
    """PyG's ``GATConv(concat=False)`` averages its heads (``out.mean(dim=1)``): heads prune,
    and the mean divides by the original head count."""
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import GATConv

    from structprune.testing import assert_oracle

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = GATConv(5, 6, heads=4, concat=False), GATConv(6, 3)

        def forward(self, x, edge_index):
            return self.c2(F.elu(self.c1(x, edge_index)), edge_index)

    torch.manual_seed(0)
    m = randomize_(Two()).double().eval()
    x, ei = torch.randn(10, 5, dtype=D), torch.randint(0, 10, (2, 30))
    pruner = sp.Pruner(m, (x, ei), ratio=0.0, head_ratio=0.5)
    assert pruner.graph.head_groups()
    pruned = assert_oracle(pruner, tol=1e-9)
    assert pruned.get_parameter("c1.lin.weight").shape == (12, 5)  # 2 of 4 heads of 6
    assert pruned.get_parameter("c1.att_src").shape == (1, 2, 6)
    # by hand: c1 with the kept heads is a GATConv of 2 heads whose mean is rescaled by 2/4
    kept = [h for h in range(4) if pruned.get_parameter("c1.att_src")[0, :, 0].eq(
        m.c1.att_src[0, h, 0]).any()]
    ref = GATConv(5, 6, heads=2, concat=False).double().eval()
    rows = torch.tensor([h * 6 + c for h in kept for c in range(6)])
    with torch.no_grad():
        ref.lin.weight.copy_(m.c1.lin.weight[rows])
        ref.att_src.copy_(m.c1.att_src[:, kept])
        ref.att_dst.copy_(m.c1.att_dst[:, kept])
        ref.bias.copy_(m.c1.bias)
    h = (ref(x, ei) - ref.bias) * (2 / 4) + ref.bias
    torch.testing.assert_close(pruned(x, ei), m.c2(F.elu(h), ei))


@pytest.mark.parametrize("op", ["mean", "cumsum"])
def test_mean_or_cumsum_over_graph_nodes_still_refuses_node_units(op):
    """Graph units: a mean or running sum over the nodes stays a refusal (the graph is pruned
    as data, with no rewrite)."""
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 4)

        def forward(self, x, edge_index):
            h = self.lin(x)
            return h - h.mean(0, keepdim=True) if op == "mean" else h.cumsum(0)

    torch.manual_seed(0)
    data = Data(x=torch.randn(8, 5), edge_index=torch.randint(0, 8, (2, 20)))
    with pytest.raises(sp.PlanError, match=op):
        sp.gnn.prune(Centred(), data, node_ratio=0.25)


# --------------------------------------------------------------------------------- repeat
REPEATS = {  # fn, channels after it, the hand-built version on the pruned h (n = kept count)
    "repeat": (lambda s, h: h.repeat(1, 1, 3), 24, lambda h: torch.cat([h, h, h], -1)),
    "repeat_tuple_new_dim": (lambda s, h: h.repeat((2, 1, 1, 2)).sum(0), 16,
                             lambda h: 2 * torch.cat([h, h], -1)),
    "tile": (lambda s, h: torch.tile(h, (2,)), 16, lambda h: torch.cat([h, h], -1)),
    "tile_method": (lambda s, h: h.tile((1, 1, 2)), 16, lambda h: torch.cat([h, h], -1)),
    "repeat_interleave": (lambda s, h: h.repeat_interleave(2, dim=-1), 16,
                          lambda h: torch.stack([h, h], -1).flatten(-2)),
    "repeat_interleave_fn": (lambda s, h: torch.repeat_interleave(h, 3, -1), 24,
                             lambda h: torch.stack([h, h, h], -1).flatten(-2)),
    "repeat_interleave_uniform_tensor": (
        lambda s, h: h.repeat_interleave(torch.tensor([2] * 8), dim=-1), 16,
        lambda h: torch.stack([h, h], -1).flatten(-2)),
}


def _copies(k, n, copies, interleave):
    """The post layer's columns that read the kept units ``k`` (of ``n``) after ``copies``."""
    if interleave:
        return torch.tensor([i * copies + c for i in k.tolist() for c in range(copies)])
    return torch.tensor([c * n + i for c in range(copies) for i in k.tolist()])


#: aten.repeat.default, aten.tile.default, aten.repeat_interleave.self_int / .self_Tensor
REPEATS_EXPORTED = ("repeat", "tile", "repeat_interleave", "repeat_interleave_uniform_tensor")


@pytest.mark.parametrize("form,export", [(f, False) for f in sorted(REPEATS)]
                         + [(f, True) for f in REPEATS_EXPORTED])
def test_repeat_keeps_the_same_units_in_every_copy(form, export):
    fn, c_post, by_hand = REPEATS[form]
    m, x = f64(Wrap(fn, c_post=c_post, export=export)), tokens()
    assert captured(m, x) == ("export" if export else "fx")
    pruned = assert_rule(m, x, drop={reader(sp.trace(m, x), "pre"): [2, 7]},
                         onnx=form in ("repeat", "repeat_interleave")
                         and not export, save_load=form == "repeat")
    k = others(8, 2, 7)
    cols = _copies(k, 8, c_post // 8, form.startswith("repeat_interleave"))
    want = F.linear(by_hand(pre_k(m, x, k)), m.post.weight[:, cols], m.post.bias)
    torch.testing.assert_close(pruned(x), want)
    if not export and form == "repeat":  # the count is unchanged: the call is as written
        assert type(pruned) is Wrap  # nothing rewritten: the user's class comes back


def test_repeat_of_a_size_one_dim_follows_what_it_meets():
    """``s.repeat(1, 1, 8)`` of a ``[B, T, 1]`` sum: copies of one value, free; the count
    becomes the pruned width."""
    m, x = f64(Wrap(lambda s, h: h * h.sum(-1, keepdim=True).repeat(1, 1, 8))), tokens()
    pruned = assert_rule(m, x, drop={"pre": [0, 1, 2]}, onnx=False, save_load=False)
    k = others(8, 0, 1, 2)
    h = pre_k(m, x, k)
    torch.testing.assert_close(pruned(x), F.linear(h * h.sum(-1, keepdim=True),
                                                   m.post.weight[:, k], m.post.bias))
    assert "repeat(1, 1, 5)" in pruned.code


def test_repeat_interleave_with_per_entry_counts_stays_whole():
    m = f64(Wrap(lambda s, h: h.repeat_interleave(torch.tensor([2, 1] * 4), dim=-1), c_post=12))
    graph = sp.trace(m, tokens())
    assert not any(p.qualname == "pre.weight" for g in graph.groups() for p in g.params)
    assert any("repeat_interleave" in e.reason for e in graph.frozen())


# ------------------------------------------------------------------------ GQA, repeat_kv
class GQA(nn.Module):
    """Grouped-query attention with Llama's ``repeat_kv`` (expand + reshape) or
    ``repeat_interleave``: 4 query heads share 2 KV heads, 2 channels per head."""

    def __init__(self, kv="expand", export=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.o = nn.Linear(8, 8)
        self.kv, self.export = kv, export

    def repeat_kv(self, h, g=2):
        if self.kv == "interleave":
            return h.repeat_interleave(g, dim=1)
        b, n_kv, s, d = h.shape
        return h[:, :, None, :, :].expand(b, n_kv, g, s, d).reshape(b, n_kv * g, s, d)

    def forward(self, x):
        if self.export and x.dim() > 8:
            x = x * 2
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, 2).transpose(1, 2)
        k = self.repeat_kv(self.k(x).view(b, s, -1, 2).transpose(1, 2))
        v = self.repeat_kv(self.v(x).view(b, s, -1, 2).transpose(1, 2))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("kv,export", [("expand", False), ("expand", True),
                                       ("interleave", False), ("interleave", True)])
def test_gqa_repeat_kv_drops_a_kv_head_with_its_query_group(kv, export):
    m, x = f64(GQA(kv, export)), torch.randn(2, 5, 8, dtype=D)
    assert captured(m, x) == ("export" if export else "fx")
    graph = sp.trace(m, x)
    heads = [g for g in graph.groups() if any(p.qualname == "k.weight" for p in g.params)]
    assert len(heads) == 1 and heads[0].num_units == 2
    pruned = assert_rule(m, x, drop={reader(sp.trace(m, x), "k"): [1]}, onnx=kv == "expand" and not export,
                         save_load=not export)  # KV head 0 (channels 0, 1) goes
    kk, kq = torch.tensor([2, 3]), torch.tensor([4, 5, 6, 7])  # and query heads 0, 1 with it
    b, s, _ = x.shape
    q = F.linear(x, m.q.weight[kq], m.q.bias[kq]).view(b, s, 2, 2).transpose(1, 2)
    k = F.linear(x, m.k.weight[kk], m.k.bias[kk]).view(b, s, 1, 2).transpose(1, 2)
    v = F.linear(x, m.v.weight[kk], m.v.bias[kk]).view(b, s, 1, 2).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k.expand(b, 2, s, 2), v.expand(b, 2, s, 2),
                                       is_causal=True)
    want = F.linear(a.transpose(1, 2).reshape(b, s, 4), m.o.weight[:, kq], m.o.bias)
    torch.testing.assert_close(pruned(x), want)
