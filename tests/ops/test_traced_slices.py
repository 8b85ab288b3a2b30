"""Slices whose bound is a traced size (``self.pos[:, :x.shape[1]]``, ``x[:, :n]`` with
``n = x.size(1)``): the bound stays symbolic, so the pruned model runs at other sizes.

The sliced dim is tied to the dim whose size is the bound (it *follows* that size): a
positional table's rows follow the sequence (an input size: whole), a slice of channels to
another tensor's width prunes with that width. Entries past the bound, which another size
reads, stay whole; a bound computed from a size (``n - 1``) freezes the sliced dim and the
size's dim with that reason. Each test checks the oracle (:func:`assert_rule`) and a pruned
network written by hand, under fx and under the ``torch.export`` capture (``aten.slice`` with
a ``sym_size`` bound), at the example size and at a second one.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.testing import assert_rule, randomize_

from .helpers import reader

D = torch.float64


def f64(m):
    return randomize_(m).double().eval()


def others(n, *drop):
    return torch.tensor([i for i in range(n) if i not in drop])


class PosTable(nn.Module):
    """A learned positional table longer than the example, sliced to the sequence length
    (timm's PiT/DaViT style, a text model's ``pos[:, :T]``)."""

    def __init__(self, form="shape", export=False):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.pos = nn.Parameter(torch.randn(1, 10, 8))
        self.form, self.export = form, export

    def forward(self, x):
        if self.export and x.dim() > 8:
            x = x * 2
        if self.form == "shape":
            pos = self.pos[:, :x.shape[1]]
        else:
            n = x.size(1)
            pos = self.pos[:, :n, :]
        return self.b(F.gelu(self.a(x) + pos))


@pytest.mark.parametrize("form,export", [("shape", False), ("size", False), ("shape", True)])
def test_positional_table_sliced_to_the_sequence_prunes_its_channels(form, export):
    m, x = f64(PosTable(form, export)), torch.randn(2, 5, 6, dtype=D)
    graph = sp.trace(m, x)
    assert graph.graph_module.meta.get("structprune_capture", "fx") == ("export" if export
                                                                        else "fx")
    dims = {(p.qualname, p.space.dim) for g in graph.groups() for p in g.params}
    assert ("pos", 2) in dims and ("pos", 1) not in dims  # channels yes, positions no
    assert any("another size reads these entries" in e.reason for e in graph.frozen())
    pruned = assert_rule(m, x, drop={reader(graph, "a"): [1, 4, 6]}, onnx=form == "shape"
                         and not export, save_load=not export)
    k = others(8, 1, 4, 6)

    def by_hand(x):
        h = F.linear(x, m.a.weight[k], m.a.bias[k]) + m.pos[:, :x.shape[1], k]
        return F.linear(F.gelu(h), m.b.weight[:, k], m.b.bias)

    torch.testing.assert_close(pruned(x), by_hand(x))
    x2 = torch.randn(3, 8, 6, dtype=D)  # another batch and sequence length: other rows
    torch.testing.assert_close(pruned(x2), by_hand(x2))
    assert pruned.get_parameter("pos").shape == (1, 10, 5)


class SliceToWidth(nn.Module):
    """``h[..., :y.size(-1)]``: ``a``'s first channels, as many as ``c`` makes, added to ``c``'s
    output; and ``z[:, :, :z.size(2)]`` (the whole dim, by its own size)."""

    def __init__(self, export=False):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(6, 10), nn.Linear(6, 8), nn.Linear(8, 3)
        self.export = export

    def forward(self, x):
        if self.export and x.dim() > 8:
            x = x * 2
        h, y = self.a(x), self.c(x)
        z = h[..., :y.size(-1)] + y
        return self.b(z[:, :, :z.size(2)])


def test_slice_to_another_tensors_width_prunes_with_that_width():
    m, x = f64(SliceToWidth()), torch.randn(2, 5, 6, dtype=D)
    graph = sp.trace(m, x)
    group = next(g for g in graph.groups() if any(p.qualname == "c.weight" for p in g.params))
    assert group.num_units == 8 and {"a.weight", "b.weight"} <= {p.qualname for p in group.params}
    pruned = assert_rule(m, x, drop={"c": [0, 5]}, onnx=True, save_load=False)
    k = others(8, 0, 5)
    z = F.linear(x, m.a.weight[k], m.a.bias[k]) + F.linear(x, m.c.weight[k], m.c.bias[k])
    torch.testing.assert_close(pruned(x), F.linear(z, m.b.weight[:, k], m.b.bias))
    assert pruned.get_parameter("a.weight").shape == (8, 6)  # 10 - 2; entries 8, 9 stay
    x2 = torch.randn(4, 3, 6, dtype=D)
    z2 = F.linear(x2, m.a.weight[k], m.a.bias[k]) + F.linear(x2, m.c.weight[k], m.c.bias[k])
    torch.testing.assert_close(pruned(x2), F.linear(z2, m.b.weight[:, k], m.b.bias))


class Computed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(6, 10), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h, y = self.a(x), self.c(x)
        return self.b(h[..., :y.size(-1) + 0] + y)


def test_a_bound_computed_from_a_size_keeps_both_dims_with_the_reason():
    m, x = f64(Computed()), torch.randn(2, 5, 6, dtype=D)
    graph = sp.trace(m, x)
    assert not graph.groups()
    assert any("sliced at a bound computed in the graph" in e.reason for e in graph.frozen())


class CropAfterPad(nn.Module):
    """Window attention's pad-then-crop (timm Swin/HaloNet/DaViT): pad the spatial dims to a
    multiple of the window, work, crop back to the input's size read from its shape."""

    def __init__(self, export=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
        self.export = export

    def forward(self, x):
        if self.export and x.dim() > 8:
            x = x * 2
        h = self.a(x)
        _, _, hh, ww = h.shape
        p = F.pad(h, (0, (4 - ww % 4) % 4, 0, (4 - hh % 4) % 4))
        p = p * p.mean((2, 3), keepdim=True)
        return self.b(p[:, :, :hh, :ww])


@pytest.mark.parametrize("export", [False, True])
def test_crop_back_to_the_input_size_runs_at_another_size(export):
    """The crop's bounds stay symbolic (fx: ``getitem`` with sizes in its slices; export:
    ``aten.slice`` up to a ``sym_size``), so the pruned model crops at any size."""
    m, x = f64(CropAfterPad(export)), torch.randn(2, 3, 6, 7, dtype=D)
    graph = sp.trace(m, x)
    assert graph.graph_module.meta.get("structprune_capture", "fx") == ("export" if export
                                                                        else "fx")
    pruned = assert_rule(m, x, drop={reader(graph, "a"): [2, 3]}, onnx=False, save_load=False)
    k = others(8, 2, 3)

    def by_hand(x):
        h = F.conv2d(x, m.a.weight[k], m.a.bias[k])
        hh, ww = h.shape[2:]
        p = F.pad(h, (0, (4 - ww % 4) % 4, 0, (4 - hh % 4) % 4))
        p = p * (p.sum((2, 3), keepdim=True) / (p.shape[2] * p.shape[3]))
        return F.conv2d(p[:, :, :hh, :ww], m.b.weight[:, k], m.b.bias)

    torch.testing.assert_close(pruned(x), by_hand(x))
    x2 = torch.randn(3, 3, 9, 5, dtype=D)
    torch.testing.assert_close(pruned(x2), by_hand(x2))
