"""Hand-built references for the gather/scatter rules (``structprune/ops/scatter.py``).

Message passing by hand on a small fixed graph: ``lin1`` makes node features, a gather puts them
on the edges, a scatter aggregates them onto the nodes, ``lin2`` reads the result. Each test
prunes named channels of ``lin1`` with :func:`assert_rule` (oracle, zero-ratio identity, ONNX,
save/load), then recomputes the pruned network from slices of the original weights and compares.
The ATen overloads are called from ``forward`` directly, as a ``torch.export`` graph calls them.
"""
import os
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import assert_rule, randomize_

aten = torch.ops.aten
N, E, C = 6, 14, 8
SRC = torch.tensor([0, 1, 2, 3, 4, 5, 0, 2, 4, 1, 3, 5, 0, 0])
DST = torch.tensor([1, 2, 3, 4, 5, 0, 3, 5, 1, 4, 0, 2, 5, 2])


def f64(m):
    return randomize_(m).double().eval()


def nodes():
    return torch.randn(N, 5, dtype=torch.float64)


def keep(n, *drop):
    return torch.tensor([i for i in range(n) if i not in drop])


class MP(nn.Module):
    """``lin2(agg(self, lin1(x)))`` with the graph as buffers."""

    def __init__(self, agg, c=C, c_out=None):
        super().__init__()
        self.lin1 = nn.Linear(5, c)
        self.lin2 = nn.Linear(c if c_out is None else c_out, 3)
        self.register_buffer("src", SRC.clone())
        self.register_buffer("dst", DST.clone())
        self.agg = agg

    def forward(self, x):
        return self.lin2(self.agg(self, self.lin1(x)))


def sliced(m, x, k, agg):
    """The pruned network by hand: lin1 keeps rows ``k``, lin2 the same columns."""
    h = F.linear(x, m.lin1.weight[k], m.lin1.bias[k])
    return F.linear(agg(m, h), m.lin2.weight[:, k], m.lin2.bias)


def scatter_add(s, h):
    msg = aten.index.Tensor(h, [s.src])  # x_j = h[src]
    index = s.dst.view(-1, 1).expand_as(msg)
    return aten.scatter_add.default(h.new_zeros(h.shape), 0, index, msg)


@pytest.mark.parametrize("fn", [scatter_add, lambda s, h: aten.scatter_add_.default(
    torch.zeros_like(h), 0, s.dst.view(-1, 1).expand_as(h[s.src]), h[s.src])],
    ids=["scatter_add", "scatter_add_"])
def test_scatter_add_sums_messages_per_channel(fn):
    m, x = f64(MP(fn)), nodes()
    pruned = assert_rule(m, x, drop={"lin1": [1, 6]})
    k = keep(C, 1, 6)

    def by_hand(s, h):  # sum over incoming edges, written as a loop
        out = torch.zeros(N, h.shape[1], dtype=h.dtype)
        for e in range(E):
            out[DST[e]] += h[SRC[e]]
        return out

    torch.testing.assert_close(pruned(x), sliced(m, x, k, by_hand))


@pytest.mark.parametrize("reduce", ["sum", "mean", "amax", "amin", "prod"])
@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_every_kind(reduce, include_self):
    def fn(s, h):
        msg = h.index_select(0, s.src)
        index = s.dst.view(-1, 1).expand_as(msg)
        return aten.scatter_reduce.two(h.new_ones(h.shape), 0, index, msg, reduce,
                                       include_self=include_self)

    m, x = f64(MP(fn)), nodes()
    # ONNX has no mean scatter and the exporter's stand-in is wrong: export_onnx's check says so
    # (test_a_mean_scatter_is_refused_by_the_onnx_check); ORT lacks a float64 prod scatter.
    pruned = assert_rule(m, x, drop={"lin1": [0, 3, 7]}, onnx=reduce not in ("mean", "prod"))
    k = keep(C, 0, 3, 7)
    ref = {"sum": torch.sum, "mean": torch.mean, "amax": lambda t, dim: t.amax(dim),
           "amin": lambda t, dim: t.amin(dim), "prod": torch.prod}[reduce]

    def by_hand(s, h):
        rows = []
        for v in range(N):
            inc = [h[SRC[e]] for e in range(E) if DST[e] == v]
            if include_self:
                inc.append(torch.ones(h.shape[1], dtype=h.dtype))
            rows.append(ref(torch.stack(inc), dim=0) if inc else
                        torch.ones(h.shape[1], dtype=h.dtype))
        return torch.stack(rows)

    torch.testing.assert_close(pruned(x), sliced(m, x, k, by_hand))


def test_index_add_and_gather():
    def fn(s, h):
        msg = aten.gather.default(h, 0, s.src.view(-1, 1).expand(E, h.shape[1]))  # == h[src]
        return aten.index_add.default(h, 0, s.dst, msg, alpha=0.5)

    m, x = f64(MP(fn)), nodes()
    pruned = assert_rule(m, x, drop={"lin1": [2, 5]})
    k = keep(C, 2, 5)

    def by_hand(s, h):
        out = h.clone()
        for e in range(E):
            out[DST[e]] += 0.5 * h[SRC[e]]
        return out

    torch.testing.assert_close(pruned(x), sliced(m, x, k, by_hand))


def test_index_with_a_2d_index_and_a_leading_slice():
    """``h.T[:, idx]``: the index [E, 2] replaces the node dim in place; channels map through."""
    pairs = torch.stack([SRC, DST], 1)

    def fn(s, h):
        t = aten.index.Tensor(h.t(), [None, s.pairs])  # [C, E, 2]
        return aten.sum.dim_IntList(t, [2]).t()[:N]  # back to [N, C]: the first N edges

    m, x = f64(MP(fn)), nodes()
    m.register_buffer("pairs", pairs)
    pruned = assert_rule(m, x, drop={"lin1": [4]})
    k = keep(C, 4)
    torch.testing.assert_close(
        pruned(x), sliced(m, x, k, lambda s, h: (h[SRC] + h[DST])[:N]))


def test_edge_softmax_per_head_and_a_sum_over_channels():
    """PyG's attention: logits ``(h * att).sum(-1)`` per head, a softmax over each node's
    incoming edges (scatter max, exp, scatter sum), messages weighted per head. Dropping a
    channel inside both heads keeps the heads; the sum over channels leaves them free."""
    H, D = 2, 4

    def fn(s, h):
        hh = h.view(N, H, D)
        logit = aten.sum.dim_IntList(hh * s.att, [-1])[s.src]  # [E, H]
        idx = s.dst.view(-1, 1).expand_as(logit)
        mx = aten.scatter_reduce.two(logit.new_zeros(N, H), 0, idx, logit, "amax",
                                     include_self=False)
        ex = (logit - mx.index_select(0, s.dst)).exp()
        den = aten.scatter_add.default(ex.new_zeros(N, H), 0, idx, ex)
        alpha = ex / den.index_select(0, s.dst)
        msg = hh[s.src] * alpha.unsqueeze(-1)  # [E, H, D]
        idx3 = s.dst.view(-1, 1, 1).expand_as(msg)
        out = aten.scatter_add.default(msg.new_zeros(N, H, D), 0, idx3, msg)
        return out.reshape(N, H * D)

    m = MP(fn)
    m.att = nn.Parameter(torch.randn(1, H, D))
    m, x = f64(m), nodes()
    pruned = assert_rule(m, x, drop={"lin1": [1]})  # channel 1 is in head 0: the whole head
    assert pruned.lin1.weight.shape[0] == D
    heads = [1]  # by hand: the kept head attends with a softmax over each node's in-edges

    def by_hand(s, h):  # h: [N, D] of the kept head
        att = m.att[0, heads[0]]
        out = torch.zeros(N, D, dtype=h.dtype)
        for v in range(N):
            inc = [e for e in range(E) if DST[e] == v]
            if not inc:
                continue
            logits = torch.stack([(h[SRC[e]] * att).sum() for e in inc])
            w = torch.softmax(logits, 0)
            out[v] = sum(w[i] * h[SRC[e]] for i, e in enumerate(inc))
        return out

    torch.testing.assert_close(pruned(x), sliced(m, x, torch.arange(D, 2 * D), by_hand))


def test_a_narrow_scatter_index_freezes_the_channels():
    """``scatter_add`` with an index of one column writes column 0 only: removing a channel
    would shift which source column lands where, so the channels stay whole."""
    def fn(s, h):
        msg = h.index_select(0, s.src)
        return aten.scatter_add.default(h.new_zeros(h.shape), 0, s.dst.view(-1, 1), msg)

    m, x = f64(MP(fn)), nodes()
    graph = sp.trace(m, x)
    assert not any("lin1.weight" in str(g) for g in graph.groups())


def test_a_mean_scatter_is_refused_by_the_onnx_check():
    """torch's ONNX exporter turns ``scatter_reduce(..., "mean")`` into something onnxruntime
    computes differently; the export check refuses it instead of writing a wrong file."""
    from structprune.export.onnx import ExportError

    def fn(s, h):
        msg = h.index_select(0, s.src)
        return aten.scatter_reduce.two(h.new_ones(h.shape), 0, s.dst.view(-1, 1).expand_as(msg),
                                       msg, "mean")

    m, x = f64(MP(fn)), nodes()
    with tempfile.TemporaryDirectory() as d, pytest.raises(ExportError, match="onnxruntime"):
        sp.export_onnx(sp.prune(m, x, ratio=0.5), x, os.path.join(d, "m.onnx"), check=True)


@pytest.mark.parametrize("reduce", ["sum", "l2", "l1", "inf", "any"])
def test_a_reduction_zeros_do_not_change_prunes_the_reduced_dim(reduce):
    """``sum``, p-norms with p >= 0 and ``any`` over the channels: the pruned network reduces
    over the kept channels only (``F.normalize``, GAT's logits), and equals the masked one."""
    def fn(s, h):
        r = {"sum": lambda: h.sum(-1, keepdim=True),
             "l2": lambda: torch.linalg.vector_norm(h, 2, dim=-1, keepdim=True),
             "l1": lambda: torch.norm(h, p=1, dim=-1, keepdim=True),
             "inf": lambda: torch.linalg.vector_norm(h, float("inf"), dim=-1, keepdim=True),
             "any": lambda: (h > 0).any(-1, keepdim=True).to(h.dtype)}[reduce]()
        return h * r

    m, x = f64(MP(fn)), nodes()
    pruned = assert_rule(m, x, drop={"lin1": [2, 5]}, onnx=reduce not in ("any",))
    torch.testing.assert_close(pruned(x), sliced(m, x, keep(C, 2, 5), fn))


def test_a_mean_over_the_channels_divides_by_the_original_count():
    """A mean is the kept channels' sum over the original count: the channels prune (the
    pruned graph multiplies the mean by kept / original); a variance, whose mean every entry
    shares, keeps them whole with the op named."""
    fn = lambda s, h: h - h.mean(-1, keepdim=True)  # noqa: E731
    m, x = f64(MP(fn)), nodes()
    pruned = assert_rule(m, x, drop={"lin1": [2, 5]}, onnx=False, save_load=False)
    torch.testing.assert_close(pruned(x), sliced(m, x, keep(C, 2, 5),
                                                 lambda s, h: h - h.sum(-1, keepdim=True) / C))
    graph = sp.trace(f64(MP(lambda s, h: h - h.var(-1, keepdim=True))), x)
    assert not any("lin1.weight" in str(g) for g in graph.groups())
    assert any("var mixes the entries" in e.reason for e in graph.frozen())


def test_self_loops_from_arange_add_each_node_to_itself():
    """GCN-style self-loops: ``arange(N)`` appended to both ends of the edge list; the loop
    positions stay whole (frozen with the reason), the channels prune."""
    def fn(s, h):
        loops = torch.arange(h.shape[0])
        src, dst = torch.cat([s.src, loops]), torch.cat([s.dst, loops])
        msg = h.index_select(0, src)
        return h.new_zeros(h.shape).index_add_(0, dst, msg)

    m, x = f64(MP(fn)), nodes()
    pruned = assert_rule(m, x, drop={"lin1": [0, 7]})
    assert any("arange's values are its positions" in e.reason for e in sp.trace(m, x).frozen())

    def by_hand(s, h):
        out = h.clone()
        for e in range(E):
            out[DST[e]] += h[SRC[e]]
        return out

    torch.testing.assert_close(pruned(x), sliced(m, x, keep(C, 0, 7), by_hand))
