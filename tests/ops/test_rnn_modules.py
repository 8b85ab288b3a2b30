"""Whole ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` modules (``ops/recurrent.py``: traced through as
one ``rnn_forward`` call with the weights as graph values).

Each test drops named hidden units (and, with ``proj_size``, projected units) with
:func:`assert_rule` (oracle, zero-ratio identity, ONNX where the exporter takes the module,
save/load) and compares with a hand-built smaller module of the same class whose weights are the
original's kept rows (every gate's) and columns.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.plan import Plan
from structprune.rules import Space
from structprune.testing import assert_oracle, assert_rule, randomize_

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}
H, F_IN = 6, 5


class Net(nn.Module):
    """``inp`` makes the features, the recurrent module runs (with an initial state made by
    ``h0``/``c0`` when ``state``), ``out`` reads the sequence and ``outh`` the final state."""

    def __init__(self, cls, state=False, batched=True, **kw):
        super().__init__()
        self.cls, self.state, self.batched = cls, state, batched
        self.tdim = 1 if batched and kw.get("batch_first") else 0  # the time dim of x
        dirs = 2 if kw.get("bidirectional") else 1
        self.layers = kw.get("num_layers", 1) * dirs
        r = kw.get("proj_size") or H
        self.inp = nn.Linear(4, F_IN)
        self.rnn = cls(F_IN, H, **kw)
        self.h0, self.c0 = nn.Linear(4, r), nn.Linear(4, H)
        self.out, self.outh = nn.Linear(dirs * r, 3), nn.Linear(r, 3)

    def forward(self, x):
        a = self.inp(x)
        if not self.state:
            y, hn = self.rnn(a)
        else:
            s = x.mean(self.tdim)  # (B, 4) or (4,)
            grow = (self.layers, -1, -1) if self.batched else (self.layers, -1)
            h0, c0 = self.h0(s).expand(*grow), self.c0(s).expand(*grow)
            y, hn = self.rnn(a, (h0, c0) if self.cls is nn.LSTM else h0)
        h = hn[0] if self.cls is nn.LSTM else hn
        extra = hn[1].sum(-1, keepdim=True) if self.cls is nn.LSTM else 0
        return self.out(y), self.outh(h) + extra


def keep(n, drop):
    return torch.tensor([i for i in range(n) if i not in drop])


def drop_units(graph, drops):
    """A plan dropping the units of ``{parameter qualname, dim: indices}``."""
    chosen = {}
    for (name, dim), idx in drops.items():
        space = Space.param(name, dim)
        for g in graph.groups():
            for m in g.params:
                if m.space == space:
                    sel = np.isin(m.index.numpy(), idx)
                    chosen.setdefault(g.id, set()).update(m.unit.numpy()[sel].tolist())
    assert chosen, f"no group holds {drops}"
    return Plan(graph, {g: torch.tensor(sorted(u)) for g, u in chosen.items()})


def by_hand(m, kh, kp=None):
    """The module ``m.rnn`` keeping hidden units ``kh`` (and projected units ``kp``), built
    from slices of the original's weights, inside a copy of ``m``'s other layers."""
    r = m.rnn
    gates = GATES[type(r)]
    dirs = 2 if r.bidirectional else 1
    state = kp if kp is not None else kh
    n_state = r.proj_size if r.proj_size else H
    kw = dict(num_layers=r.num_layers, bias=r.bias, batch_first=r.batch_first,
              bidirectional=r.bidirectional)
    if isinstance(r, nn.RNN):
        kw["nonlinearity"] = r.nonlinearity
    if r.proj_size:
        kw["proj_size"] = len(kp)
    ref = type(r)(F_IN, len(kh), **kw).double()
    rows = torch.cat([kh + g * H for g in range(gates)])
    prev = torch.cat([state + d * n_state for d in range(dirs)])
    with torch.no_grad():
        for name, p in ref.named_parameters():
            src = getattr(r, name)
            if name.startswith("weight_hr"):
                p.copy_(src[state][:, kh])
                continue
            t = src[rows]
            if name.startswith("weight_hh"):
                t = t[:, state]
            elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                t = t[:, prev]
            p.copy_(t)
    return ref, prev, state


CASES = [
    (nn.LSTM, dict(batch_first=True), True, False),
    (nn.GRU, dict(num_layers=2, bidirectional=True, batch_first=True), True, True),
    (nn.RNN, dict(bias=False, nonlinearity="relu", num_layers=2), True, True),
    (nn.LSTM, dict(num_layers=2, bidirectional=True), False, True),
    (nn.GRU, dict(), False, False),
]


@pytest.mark.parametrize("cls,kw,batched,state", CASES,
                         ids=["lstm", "gru-2x2-state", "rnn-relu-nobias-2", "lstm-unbatched-2x2",
                              "gru-unbatched"])
def test_hidden_units_go_with_their_gate_rows_in_every_layer_and_direction(cls, kw, batched,
                                                                            state):
    m = randomize_(Net(cls, state=state, batched=batched, **kw)).double().eval()
    x = torch.randn(*((3, 7, 4) if batched else (7, 4)), dtype=torch.float64)  # (T, B) or (B, T)
    assert sp.trace(m, x).graph_module.meta.get("structprune_capture") != "export"
    drop = [1, 4]
    pruner = sp.Pruner(m, x, ratio=0.5)
    plan = drop_units(pruner.graph, {("rnn.weight_hh_l0", 1): drop})
    pruned = assert_oracle(pruner, plan)
    kh = keep(H, drop)
    assert pruned.rnn.hidden_size == 4 and pruned.rnn.weight_hh_l0.shape == (GATES[cls] * 4, 4)
    ref, prev, kept = by_hand(m, kh)
    a = m.inp(x)
    if state:
        s = x.mean(m.tdim)
        h0 = m.h0(s).expand(m.layers, *s.shape[:-1], -1)[..., kh]
        c0 = m.c0(s).expand(m.layers, *s.shape[:-1], -1)[..., kh]
        y, hn = ref(a, (h0, c0) if cls is nn.LSTM else h0)
    else:
        y, hn = ref(a)
    h = hn[0] if cls is nn.LSTM else hn
    extra = hn[1].sum(-1, keepdim=True) if cls is nn.LSTM else 0
    want = (F.linear(y, m.out.weight[:, prev], m.out.bias),
            F.linear(h, m.outh.weight[:, kept], m.outh.bias) + extra)
    for g, w in zip(pruned(x), want):
        torch.testing.assert_close(g, w)


def test_lstm_with_proj_size_prunes_hidden_and_projected_units():
    m = randomize_(Net(nn.LSTM, state=True, num_layers=2, bidirectional=True, batch_first=True,
                       proj_size=4)).double().eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    pruner = sp.Pruner(m, x, ratio=0.5)
    groups = {g.num_units for g in pruner.graph.groups()}
    assert {H, 4} <= groups  # the hidden units and the projected (state) units
    plan = drop_units(pruner.graph, {("rnn.weight_hr_l0", 1): [0, 3], ("rnn.weight_hh_l0", 1): [2]})
    pruned = assert_oracle(pruner, plan)
    r = pruned.rnn
    assert (r.hidden_size, r.proj_size) == (4, 3) and r.weight_hr_l1_reverse.shape == (3, 4)
    kh, kp = keep(H, [0, 3]), keep(4, [2])
    ref, prev, _ = by_hand(m, kh, kp)
    s = x.mean(m.tdim)
    h0 = m.h0(s).expand(m.layers, *s.shape[:-1], -1)[..., kp]
    c0 = m.c0(s).expand(m.layers, *s.shape[:-1], -1)[..., kh]
    y, (h, c) = ref(m.inp(x), (h0, c0))
    want = (F.linear(y, m.out.weight[:, prev], m.out.bias),
            F.linear(h, m.outh.weight[:, kp], m.outh.bias) + c.sum(-1, keepdim=True))
    for g, w in zip(pruned(x), want):
        torch.testing.assert_close(g, w)
    # the exporter takes no LSTM with proj_size (unpruned either): no ONNX check here
    assert_rule(m, x, ratio=0.5, onnx=False)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_whole_module_checks_onnx_and_save_load(cls):
    m = randomize_(Net(cls, state=cls is not nn.RNN, num_layers=2, bidirectional=True,
                       batch_first=True)).double().eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    pruned = assert_rule(m, x, ratio=0.5)  # zero ratio, oracle, ONNX, save/load
    assert type(pruned) is Net and pruned.rnn.hidden_size == H // 2
    assert pruned.rnn.input_size == pruned.inp.out_features < F_IN


def test_macs_follow_the_hidden_units():
    m = Net(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(2, 5, 4)
    b, t = 2, 5

    def lstm_macs(f, h):  # 4 gates, input and recurrent products, per step, direction, layer
        return 2 * 4 * h * ((f + h) + (2 * h + h)) * b * t

    graph = sp.trace(m, x)
    from structprune.macs import count_macs

    _, per_node = count_macs(graph, per_node=True)
    node = next(n.name for n in graph.graph_module.graph.nodes if n.name.startswith("rnn_forward"))
    assert per_node[node] == lstm_macs(F_IN, H)
    pruned = sp.prune(m, x, ratio=0.5)
    _, after = count_macs(sp.trace(pruned, x), per_node=True)
    assert after[node] == lstm_macs(pruned.rnn.input_size, H // 2)


def test_a_leaf_module_stays_frozen_with_the_reason():
    m = Net(nn.GRU, batch_first=True).eval()
    x = torch.randn(2, 5, 4)
    g = sp.trace(m, x, leaf_modules=[nn.GRU])
    assert any("kept whole" in e.reason for e in g.frozen())
    assert not any(p.qualname.startswith("rnn.") for grp in g.groups() for p in grp.params)
    assert any(p.qualname.startswith("rnn.") for grp in sp.trace(m, x).groups()
               for p in grp.params)


class Tagger(nn.Module):
    """Embedding -> bidirectional 2-layer LSTM -> per-token Linear."""

    def __init__(self, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.tag = nn.Linear(32, 5)

    def forward(self, ids):
        return self.tag(self.lstm(self.emb(ids))[0])


def test_an_lstm_tagger_prunes_half_its_hidden_units():
    from structprune.macs import count_macs

    torch.manual_seed(0)
    m = Tagger().double().eval()
    ids = torch.randint(0, 50, (2, 7))
    pruned = assert_rule(m, ids, ratio=0.5)
    assert type(pruned) is Tagger
    assert (pruned.lstm.hidden_size, pruned.lstm.input_size) == (8, 6)
    assert pruned.tag.in_features == 16
    before, after = count_macs(sp.trace(m, ids)), count_macs(sp.trace(pruned, ids))
    assert after < 0.3 * before, (before, after)  # about a quarter: both sizes halved
    assert pruned(torch.randint(0, 50, (3, 11))).shape == (3, 11, 5)  # any batch and length


class ShapeBranch(Net):
    """``Net`` behind a branch on a shape, which fx cannot trace: captured by torch.export, the
    module runs as ``aten.lstm.input`` / ``aten.gru.input`` with its weights as graph values."""

    def forward(self, x):
        if x.shape[-1] > 0:
            x = x * 1.0
        return super().forward(x)


@pytest.mark.parametrize("cls,proj", [(nn.GRU, 0), (nn.LSTM, 4)],
                         ids=["gru-state", "lstm-proj"])
def test_export_captured_modules_prune_hidden_units_too(cls, proj):
    kw = dict(num_layers=2, bidirectional=True, batch_first=True)
    if proj:
        kw["proj_size"] = proj
    m = randomize_(ShapeBranch(cls, state=not proj, **kw)).double().eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    pruner = sp.Pruner(m, x, ratio=0.5)
    assert pruner.graph.graph_module.meta.get("structprune_capture") == "export"
    plan = drop_units(pruner.graph, {("rnn.weight_hh_l0", 1): [0, 2]})
    pruned = assert_oracle(pruner, plan)
    kept = keep(proj or H, [0, 2])
    assert pruned.get_parameter("rnn.weight_hh_l1_reverse").shape[1] == len(kept)
    assert pruned(torch.randn(3, 5, 4, dtype=torch.float64))[0].shape == (3, 5, 3)  # any batch
    assert_rule(m, x, ratio=0.5, onnx=False)  # ONNX: checked on fx-captured modules above


def test_one_mask_per_node_is_enough_for_a_projected_lstm():
    """The contract's oracle masks one dim per node (``plan.activation_masks()``): for a
    weight whose rows and columns both lose units (``weight_hr``: projected units it writes,
    hidden units it reads) that is the dim it produces, else the projected units live on in
    the masked original (an independent check found this)."""
    from structprune.oracle import MaskedInterpreter, max_rel_diff

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.LSTM(16, 24, batch_first=True, proj_size=8)).double()
    x = torch.randn(3, 7, 6, dtype=torch.float64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = m, nn.Linear(8, 5).double()

        def forward(self, x):
            return self.head(self.body(x)[0])

    net = Net().eval()
    pruner = sp.Pruner(net, x, ratio=0.5)
    plan = pruner.plan()
    masks = plan.activation_masks()
    both = {k: v for k, v in plan.activation_masks_all().items() if len(v) > 1}
    assert any("weight_hr" in k for k in both)  # rows and columns both pruned
    pruned = pruner.apply(plan)
    with torch.no_grad():
        want = MaskedInterpreter(plan.graph.graph_module, masks).run(x)
        assert max_rel_diff(pruned(x), want) < 1e-12
