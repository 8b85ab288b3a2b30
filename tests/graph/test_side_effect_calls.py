"""A call whose result nobody reads is kept when it may act in place: torchvision's MViT adds
its pooled query into the attention output through an ``fx.wrap``-ed helper that returns a
value the model discards; dropping the call captured another model (silently wrong)."""
import torch
import torch.fx as fx
import torch.nn as nn

import structprune as sp
from structprune.testing import randomize_


def _add_into(x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    x[:, 1:] += shortcut[:, 1:]
    return x


fx.wrap("_add_into")


class InPlaceShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x).relu()
        _add_into(h, self.b(x))  # the result is not read: the write into h is the point
        return self.out(h)


def test_an_unread_call_of_a_wrapped_function_stays_in_the_graph():
    torch.manual_seed(0)
    model = randomize_(InPlaceShortcut()).double().eval()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    gm = sp.trace(model, x).graph_module
    assert any(getattr(n.target, "__name__", "") == "_add_into" for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    # the helper has no rule: what it reads and writes stays whole, with that reason
    assert any("no rule for" in e.reason and "_add_into" in e.reason
               for e in sp.trace(model, x).frozen())


class CountsBatches(nn.Module):
    """timm's BatchNormAct2d: in train mode its forward counts batches in a buffer, in place."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.seen.add_(1)
        return self.out(self.a(x).relu())


def test_tracing_leaves_the_models_buffers_as_they_were():
    """fx gives a traced forward the real buffers; the trace in the other mode (to find
    modules a mode leaves out) and a trace in train mode ran that ``add_`` for real."""
    x = torch.randn(4, 6)
    model = CountsBatches().eval()
    sp.prune(model, x, ratio=0.5)
    assert int(model.seen) == 0
    model.train()
    sp.trace(model, x)
    assert int(model.seen) == 0
