"""Hand-built references for the recurrent cell rules (``structprune/ops/recurrent.py``).

``lin_in`` makes the input features, a cell runs two steps, ``lin_out`` reads the last state.
Each test drops named hidden units with :func:`assert_rule` (oracle, zero-ratio identity, ONNX,
save/load) and recomputes the pruned cell by hand from the original weights' kept rows (every
gate's) and columns.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from structprune.testing import assert_rule, randomize_

aten = torch.ops.aten
H = 6


def keep(n, *drop):
    return torch.tensor([i for i in range(n) if i not in drop])


def gate_rows(k, gates):
    return torch.cat([k + g * H for g in range(gates)])


class Steps(nn.Module):
    def __init__(self, cell, aten_op=None):
        super().__init__()
        self.lin_in = nn.Linear(4, 5)
        self.cell = cell
        self.lin_out = nn.Linear(H, 3)
        self.aten_op = aten_op

    def step(self, x, h):
        c = self.cell
        if self.aten_op is None:
            return c(x, h)
        return self.aten_op(x, h, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)

    def forward(self, x):
        a = self.lin_in(x)
        h = self.step(a, None) if self.aten_op is None else self.step(a, a.new_zeros(a.shape[0], H))
        h = self.step(torch.tanh(a), h)
        return self.lin_out(h)


def by_hand(m, x, k, gates, kind):
    """The pruned model from slices: the cell keeps hidden units ``k`` in every gate."""
    c = m.cell
    rows = gate_rows(k, gates)
    cell = {"rnn": nn.RNNCell, "gru": nn.GRUCell}[kind](5, len(k)).double()
    with torch.no_grad():
        cell.weight_ih.copy_(c.weight_ih[rows])
        cell.weight_hh.copy_(c.weight_hh[rows][:, k])
        cell.bias_ih.copy_(c.bias_ih[rows])
        cell.bias_hh.copy_(c.bias_hh[rows])
    a = m.lin_in(x)
    h = cell(torch.tanh(a), cell(a))
    return F.linear(h, m.lin_out.weight[:, k], m.lin_out.bias)


@pytest.mark.parametrize("kind,cls,gates,op,node", [
    ("gru", nn.GRUCell, 3, None, "cell"), ("rnn", nn.RNNCell, 1, None, "cell"),
    ("gru", nn.GRUCell, 3, aten.gru_cell.default, "gru_cell_default"),
    ("rnn", nn.RNNCell, 1, aten.rnn_tanh_cell.default, "rnn_tanh_cell_default")],
    ids=["GRUCell", "RNNCell", "aten.gru_cell", "aten.rnn_tanh_cell"])
def test_cell_drops_a_hidden_unit_from_every_gate(kind, cls, gates, op, node):
    m = randomize_(Steps(cls(5, H), op)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    pruned = assert_rule(m, x, drop={node: [1, 4]}, onnx=op is None)
    k = keep(H, 1, 4)
    assert dict(pruned.named_parameters())["cell.weight_hh"].shape == (gates * 4, 4)
    torch.testing.assert_close(pruned(x), by_hand(m, x, k, gates, kind))


def test_lstm_cell_prunes_both_states():
    class LSTMStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin_in, self.cell, self.lin_out = nn.Linear(4, 5), nn.LSTMCell(5, H), nn.Linear(H, 3)

        def forward(self, x):
            h, c = self.cell(self.lin_in(x))
            h, c = self.cell(x.new_ones(x.shape[0], 5), (h, c))
            return self.lin_out(h + c)

    m = randomize_(LSTMStep()).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    pruned = assert_rule(m, x, ratio=0.5, onnx=False)
    cell = pruned.cell  # hidden units and input features both pruned, attributes follow
    assert cell.hidden_size == H // 2 and cell.input_size < 5
    assert cell.weight_ih.shape == (4 * H // 2, cell.input_size)
    assert cell.weight_hh.shape == (4 * H // 2, H // 2)


class LSTMOp(nn.Module):
    """A whole bidirectional ``nn.LSTM`` as ``aten.lstm.input`` (as torch.export writes it)."""

    def __init__(self):
        super().__init__()
        self.lin_in = nn.Linear(4, 5)
        self.lstm = nn.LSTM(5, 3, bidirectional=True, batch_first=True)
        self.lin_out = nn.Linear(6, 2)

    def forward(self, x):
        a = self.lin_in(x)
        h0 = a.new_zeros(2, a.shape[0], 3)
        out = aten.lstm.input(a, [h0, h0], self.lstm._flat_weights, True, 1, 0.0, False, True,
                              True)[0]
        return self.lin_out(out)


def test_a_whole_lstm_op_prunes_its_input_features():
    m = randomize_(LSTMOp()).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    pruned = assert_rule(m, x, drop={"lin_in": [1, 3]}, onnx=False)
    k = keep(5, 1, 3)
    ref = nn.LSTM(3, 3, bidirectional=True, batch_first=True).double()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            src = getattr(m.lstm, name)
            p.copy_(src[:, k] if name.startswith("weight_ih") else src)
    want = m.lin_out(ref(F.linear(x, m.lin_in.weight[k], m.lin_in.bias[k]))[0])
    torch.testing.assert_close(pruned(x), want)
