"""The shortcuts the engine takes for speed must agree exactly with what they replace.

* meta-device shape shortcuts (conv/linear formulas, float arithmetic) vs. the real kernels;
* the dictionary copy of plain modules in ``slicing.copy_sliced`` vs. ``copy.deepcopy``;
* grouping after whole-space merging (``SpaceTable.merge``) vs. the unmerged element solve.
"""
import copy
import operator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import models
import structprune as sp
from structprune.slicing import copy_sliced
from structprune.graph import coupling
from structprune.graph.group import build_groups
from structprune.graph.fast_paths import _conv_shape, _meta_elementwise, _meta_fast_path


# ---------------------------------------------------------------------------- conv/linear shapes
@st.composite
def conv_case(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = draw(st.one_of(st.just("valid"), st.just("same"),
                             st.tuples(*[st.integers(0, 2)] * nd)))
    if padding == "same":
        stride = (1,) * nd
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    size = tuple(draw(st.integers(1, 9)) for _ in range(nd))
    batch = draw(st.integers(1, 2))
    return nd, cin, cout, k, stride, dilation, padding, groups, mode, size, batch


@settings(max_examples=150, deadline=None, derandomize=True)
@given(conv_case())
def test_conv_shape_formula_matches_the_kernel(case):
    nd, cin, cout, k, stride, dilation, padding, groups, mode, size, batch = case
    conv = getattr(nn, f"Conv{nd}d")(cin, cout, k, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, padding_mode=mode)
    x = torch.randn(batch, cin, *size)
    try:
        want = tuple(conv(x).shape)
    except RuntimeError:  # invalid geometry: the shortcut must not claim a shape
        want = None
    got = _conv_shape(conv, x.to("meta"))
    if got is not None:
        assert got == want, (case, got, want)
    if want is None:  # the meta kernel then raises like the real one
        with pytest.raises(RuntimeError):
            _meta_fast_path(conv, (x.to("meta"),), {})
    else:  # formula or meta kernel
        assert tuple(_meta_fast_path(conv, (x.to("meta"),), {}).shape) == want


def test_conv_shape_declines_what_it_cannot_vouch_for():
    conv = nn.Conv2d(4, 6, 3)
    assert _conv_shape(conv, torch.empty(1, 5, 8, 8, device="meta")) is None  # wrong channels
    assert _conv_shape(conv, torch.empty(4, 8, 8, device="meta")) is None  # unbatched
    assert _conv_shape(conv, torch.empty(1, 4, 8, 8, device="meta").to(
        memory_format=torch.channels_last)) is None
    assert _conv_shape(conv, torch.empty(1, 4, 8, 8, dtype=torch.float64,
                                         device="meta")) is None
    with pytest.raises(RuntimeError):  # and the meta kernel then raises like the real one
        _meta_fast_path(conv, (torch.empty(1, 5, 8, 8, device="meta"),), {})


def test_linear_shortcut():
    lin = nn.Linear(6, 3)
    for shape in [(6,), (2, 6), (2, 4, 6)]:
        out = _meta_fast_path(lin, (torch.empty(shape, device="meta"),), {})
        assert tuple(out.shape) == tuple(lin(torch.randn(shape)).shape)
    with pytest.raises(RuntimeError):
        _meta_fast_path(lin, (torch.empty(2, 5, device="meta"),), {})


def test_shape_preserving_modules_are_named_by_their_rule(monkeypatch):
    """The shortcut asks the module's registered rule (``OpRule.preserves_shape``), not a list."""
    from structprune.ops.elementwise import UnaryRule

    x = torch.empty(2, 3, 5, device="meta")
    assert _meta_fast_path(nn.GELU(), (x,), {}).shape == x.shape
    assert _meta_fast_path(nn.Flatten(), (x,), {}) is None  # its rule does not say so
    monkeypatch.setattr(UnaryRule, "preserves_shape", False)
    assert _meta_fast_path(nn.GELU(), (x,), {}) is None


# ------------------------------------------------------------------------ float arithmetic
SHAPES = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (3, 1)), ((1, 3, 1), (2, 1, 5)), ((4,), ()),
          ((2, 3), (2, 1))]


@pytest.mark.parametrize("op", [operator.add, operator.sub, operator.mul, operator.truediv,
                                torch.add, torch.mul, "add", "mul", "sub", "div"])
@pytest.mark.parametrize("shapes", SHAPES)
def test_binary_shortcut_matches_real(op, shapes):
    a, b = torch.randn(shapes[0]), torch.randn(shapes[1])

    def call(x, y):
        return getattr(x, op)(y) if isinstance(op, str) else op(x, y)

    want = call(a, b)
    got = _meta_elementwise(op, (a.to("meta"), b.to("meta")), {})
    assert got is not None and got.shape == want.shape and got.dtype == want.dtype
    assert got.is_contiguous() == want.is_contiguous()
    got = _meta_elementwise(op, (a.to("meta"), 2.5), {})
    assert got.shape == call(a, 2.5).shape


def test_binary_shortcut_declines_mixed_or_integer_dtypes_and_layouts():
    m = torch.empty(2, 3, device="meta")
    assert _meta_elementwise(operator.add, (m, m.double()), {}) is None
    assert _meta_elementwise(operator.add, (m.long(), m.long()), {}) is None
    assert _meta_elementwise(operator.add, (m, True), {}) is None
    assert _meta_elementwise(operator.add, (m.t(), m.t()), {}) is None  # not contiguous
    assert _meta_elementwise(torch.add, (m, m), {"alpha": 2}) is None
    assert _meta_elementwise(operator.matmul, (m, m.t()), {}) is None
    assert _meta_elementwise(F.relu, (m.long(),), {}) is None
    assert _meta_elementwise(F.relu, (m,), {"inplace": True}).shape == m.shape


# ------------------------------------------------------------------------------ module copy
class Scaler(nn.Module):
    """A leaf with a mutable plain attribute, a non-persistent buffer and a hook."""

    def __init__(self):
        super().__init__()
        self.scales = [1.0, 2.0]
        self.register_buffer("shift", torch.zeros(1), persistent=False)
        self.seen = []
        self.register_forward_hook(lambda mod, inp, out: None)

    def forward(self, x):
        return x * self.scales[1] + self.shift


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied
        self.s = Scaler()

    def forward(self, x):
        return self.s(self.b(self.a(x)))


def test_copy_matches_deepcopy_and_keeps_aliasing():
    torch.manual_seed(0)
    gm = sp.trace(Tied(), torch.randn(2, 4), leaf_modules=[Scaler]).graph_module
    ref, new = copy.deepcopy(gm), copy_sliced(gm, {})
    assert new.b.weight is new.a.weight and new.a.weight is not gm.a.weight
    assert new.s.scales == ref.s.scales and new.s.scales is not gm.s.scales
    assert new.s._non_persistent_buffers_set == {"shift"} and new.s.shift is not gm.s.shift
    assert len(new.s._forward_hooks) == len(gm.s._forward_hooks) == 1
    assert set(new.state_dict()) == set(ref.state_dict())
    for k, v in gm.state_dict(keep_vars=True).items():
        assert torch.equal(new.state_dict()[k], v) and new.state_dict(keep_vars=True)[k] is not v
    x = torch.randn(3, 4)
    assert torch.equal(new(x), gm(x))
    with torch.no_grad():
        new.a.weight.add_(1)
    assert not torch.equal(new.a.weight, gm.a.weight)  # independent storage
    assert new.a.weight.requires_grad and isinstance(new.a.weight, nn.Parameter)


def test_copy_of_a_pruned_resnet_is_independent():
    torch.manual_seed(0)
    m = models.get("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    p = sp.Pruner(m, x, ratio=0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pruned = p.apply(p.plan())
    with torch.no_grad():
        for t in pruned.parameters():
            t.mul_(0)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------- space merging
def _signature(groups):
    return sorted(
        (g.num_units, tuple(sorted(
            (m.space, tuple(sorted(m.index[m.unit == u].tolist()))) for m in g.members))
         ) for g in groups for u in range(g.num_units))


@pytest.mark.parametrize("name", ["resnet20", "densenet", "shufflenetv2", "vit"])
def test_merged_solve_groups_like_the_element_solve(name, monkeypatch):
    torch.manual_seed(0)
    m = models.get(name).eval()
    x = models.example_inputs(name)
    graph = sp.trace(m, x)
    merged = _signature(graph.groups())
    # The same records solved with no whole-space merging at all.
    monkeypatch.setattr(coupling.SpaceTable, "merge", lambda self, records: list(records))
    table = coupling.SpaceTable()
    for s in graph.table.order:
        table.add(s, graph.table.size[s])
    sol = coupling.solve(table, list(graph.records))
    plain = _signature(build_groups(table, sol, graph.roles))
    assert merged == plain
    assert np.count_nonzero(graph.solution.label == graph.solution.frozen_label) < len(
        graph.solution.label)


@pytest.mark.parametrize("name", ["densenet", "vit"])
def test_units_matrix_equals_member_by_member(name):
    from structprune.importance.base import lp_per_index, tensor_of, to_units, units_matrix

    torch.manual_seed(0)
    m = models.get(name).eval()
    graph = sp.trace(m, models.example_inputs(name))
    for g in graph.groups():
        members = g.params
        values = [lp_per_index(tensor_of(graph, mm), mm.dim, 2) for mm in members]
        want = torch.stack([to_units(g, mm, v) for mm, v in zip(members, values)])
        torch.testing.assert_close(units_matrix(g, members, values), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dim", [0, 1, -1, 2])
def test_cat_shortcut_matches_real(dim):
    xs = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    xs = [x.narrow(dim, 0, 1 + k) for k, x in enumerate(xs)]  # different sizes along dim
    xs = [x.contiguous() for x in xs]
    want = torch.cat(xs, dim)
    for f in (torch.cat, torch.concat):
        got = _meta_elementwise(f, ([x.to("meta") for x in xs], dim), {})
        assert got.shape == want.shape and got.dtype == want.dtype
    got = _meta_elementwise(torch.cat, ([x.to("meta") for x in xs],), {"dim": dim})
    assert got.shape == want.shape


def test_cat_shortcut_declines_what_the_kernel_must_judge():
    a = torch.empty(2, 3, device="meta")
    assert _meta_elementwise(torch.cat, ([a, torch.empty(3, 3, device="meta")], 1), {}) is None
    assert _meta_elementwise(torch.cat, ([a, a.double()], 0), {}) is None
    assert _meta_elementwise(torch.cat, ([a, a.t()], 0), {}) is None
    assert _meta_elementwise(torch.cat, ([a, a], 2), {}) is None
    assert _meta_elementwise(torch.cat, ([a, torch.empty(3, device="meta")], 0), {}) is None
    assert _meta_elementwise(torch.cat, ([], 0), {}) is None


def test_scratch_space_is_shared_inside_and_fresh_outside():
    from structprune.scratch import scratch_space, temporary

    a = temporary((2, 3), torch.float32, torch.device("cpu"))
    b = temporary((2, 3), torch.float32, torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr()
    with scratch_space():
        c = temporary((2, 3), torch.float32, torch.device("cpu"))
        d = temporary((4, 5), torch.float32, torch.device("cpu"))  # grows the buffer
        e = temporary((1, 2), torch.float32, torch.device("cpu"))
        assert e.data_ptr() == d.data_ptr() and c.shape == (2, 3) and d.shape == (4, 5)
        assert temporary((2,), torch.float64, torch.device("cpu")).dtype == torch.float64


@pytest.mark.parametrize("name", ["resnet20", "densenet", "vit"])
def test_pruned_tensors_own_their_memory(name):
    """No pruned parameter or buffer may be a view of scratch space or of another tensor."""
    torch.manual_seed(0)
    m = models.get(name).eval()
    x = models.example_inputs(name)
    pruned = sp.prune(m, x, ratio=0.5, importance="l2")
    storages = {}
    for key, t in list(pruned.named_parameters()) + list(pruned.named_buffers()):
        if t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        assert ptr not in storages, f"{key} shares memory with {storages[ptr]}"
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), key
        storages[ptr] = key


def test_choice_keyed_on_an_empty_space_and_add_after_merge():
    from structprune.graph.coupling import Choice, Couple, Space, SpaceTable, solve

    t = SpaceTable()
    a, z, b = Space.activation("a", 0), Space.activation("z", 0), Space.activation("b", 0)
    for s, n in ((a, 2), (z, 0), (b, 2)):
        t.add(s, n)
    sol = solve(t, [Couple(a, b), Choice([(z, []), (a, [])])])
    assert not sol.is_frozen(t.ids(a, None)).any()
    with pytest.raises(RuntimeError, match="after merge"):
        t.add(Space.activation("c", 0), 1)


class Views(nn.Module):
    def __init__(self):
        super().__init__()
        base = torch.zeros(8)
        self.register_buffer("a", base[:4])
        self.register_buffer("b", base[2:6])  # overlaps a
        self.register_buffer("s", torch.ones(4, requires_grad=True))
        self.register_buffer("e", torch.ones(1).expand(4))  # stride 0

    def forward(self, x):
        return x + self.a + self.b + self.s + self.e


def test_copy_keeps_buffer_views_strides_and_requires_grad():
    gm = torch.fx.symbolic_trace(Views())
    for t in (copy.deepcopy(gm), copy_sliced(gm, {})):
        t.a.add_(1)
        assert t.b.tolist() == [1.0, 1.0, 0.0, 0.0]
        assert t.s.requires_grad and t.e.stride() == (0,)
        assert gm.a.tolist() == [0.0] * 4
