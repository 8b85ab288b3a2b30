"""Models that ``torch.fx`` cannot trace (they branch on shapes or turn sizes into Python ints)
are captured with ``torch.export`` instead, and must prune exactly like traceable ones.

Every model here first checks that fx really fails on it, so the tests exercise the fallback.
"""
import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.graph.capture import capture
from structprune.rules import registry
from structprune.oracle import masked_output
from structprune.testing import MaskedInterpreter, assert_rule, max_rel_diff, randomize_
from tests.test_errors import Branchy


class ResidualShapeIf(nn.Module):
    """A residual CNN that resizes its input when it is not 8x8 (``if x.shape[-1] != 8``)."""

    def __init__(self, c: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, 2 * c, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        if x.shape[-1] != 8:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        x = F.relu(self.down(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class LoopOverTime(nn.Module):
    """A recurrent-style sum over ``range(x.size(1))`` (unrolled by export)."""

    def __init__(self, d: int = 6, h: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.mix = nn.Linear(h, h)
        self.head = nn.Linear(h, classes)

    def forward(self, x):  # [B, T, d]
        h = x.new_zeros(x.size(0), self.mix.out_features)
        for t in range(x.size(1)):
            h = torch.tanh(self.mix(h) + self.inp(x[:, t]))
        return self.head(h)


class IntSizes(nn.Module):
    """Sizes read as Python ints feed a ``view`` and the arithmetic of a pooling window."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.fc = nn.Linear(c * 4, 4)

    def forward(self, x):
        b, c_in, hgt, wid = (int(s) for s in x.shape)
        y = F.relu(self.bn(self.conv(x)))
        k = hgt // 2
        y = F.avg_pool2d(self.conv2(y), k)  # [B, C, 2, 2]
        c = int(y.shape[1])
        return self.fc(y.reshape(b, c * int(y.shape[2]) * int(y.shape[3])))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with heads; the head count is computed from ``x.shape``.

    q, k and v are slices of one projection (``aten.slice``), heads are a reshape, and the
    attention is written out (matmul, softmax) when the sequence is short.
    """

    def __init__(self, dim: int = 16, head_dim: int = 4, hidden: int = 24) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        b, t, c = x.shape
        heads = int(c // self.head_dim)
        qkv = self.qkv(self.norm1(x))
        q, k, v = (qkv[:, :, i * c:(i + 1) * c].reshape(b, t, heads, self.head_dim).transpose(1, 2)
                   for i in range(3))
        if t <= 16:
            attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            out = attn.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(out.transpose(1, 2).reshape(b, t, heads * self.head_dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SDPAHeads(nn.Module):
    """Heads through ``scaled_dot_product_attention`` and ``unbind``, then a class token."""

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        b, t, c = x.shape
        if t % 2:
            x = x[:, :-1]
            t -= 1
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.head(self.proj(out)[:, 0])


def img(*shape):
    return torch.randn(*shape, dtype=torch.float64)


CASES = {
    "residual_shape_if": (ResidualShapeIf, lambda: img(2, 3, 10, 10)),
    "loop_over_time": (LoopOverTime, lambda: img(2, 4, 6)),
    "int_sizes": (IntSizes, lambda: img(2, 3, 8, 8)),
    "attention_block": (AttentionBlock, lambda: img(2, 5, 16)),
    "sdpa_heads": (SDPAHeads, lambda: img(2, 7, 12)),
}


def build(name):
    make, inp = CASES[name]
    torch.manual_seed(0)
    return randomize_(make()).double().eval(), inp()


def fx_fails(model):
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    with pytest.raises(sp.TraceError):
        capture(model, registry())  # no example inputs: no fallback


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("importance", ["l2", "random"])
def test_oracle(name, importance):
    model, x = build(name)
    fx_fails(model)
    graph = sp.trace(model, x)
    assert graph.graph_module.meta["structprune_capture"] == "export"
    assert graph.groups(), f"nothing prunable; frozen: {graph.frozen()}"
    torch.manual_seed(1)
    pruned = assert_rule(model, x, ratio=0.5, importance=importance, onnx=importance == "l2")
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_parameters_keep_their_names_and_tensors():
    model, x = build("residual_shape_if")
    gm = sp.trace(model, x).graph_module
    assert dict(gm.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert all(gm.get_parameter(n) is p for n, p in model.named_parameters())
    assert gm.state_dict().keys() == model.state_dict().keys()  # num_batches_tracked too
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert not any(t.startswith("_guards_fn") for t in calls)
    # the BatchNorm calls are the model's own modules again (they follow .train())
    assert calls and all(isinstance(gm.get_submodule(t), torch.nn.BatchNorm2d) for t in calls)


def test_node_names_are_stable_and_masks_name_the_traced_graph():
    model, x = build("attention_block")
    a, b = sp.trace(model, x).graph_module, sp.trace(model, x).graph_module
    assert [n.name for n in a.graph.nodes] == [n.name for n in b.graph.nodes]
    pruner = sp.Pruner(model, x, ratio=0.5)
    plan = pruner.plan()
    masks = plan.activation_masks()
    names = {n.name for n in a.graph.nodes}
    assert masks and set(masks) <= names
    with torch.no_grad():
        want = MaskedInterpreter(a, masks).run(x)  # the external checker's recipe
        got = pruner.apply(plan)(x)
    assert max_rel_diff(got, want) <= 1e-10


def test_head_pruning_rewrites_slices_and_reshapes():
    model, x = build("attention_block")
    graph = sp.trace(model, x)
    heads = [g for g in graph.groups() if any(m.qualname == "qkv.weight" for m in g.params)]
    assert heads and heads[0].num_units == 4 and heads[0].width == 4 * 3  # q, k, v rows of a head
    pruned = sp.prune(model, x, ratio=0.5)
    assert tuple(pruned.get_parameter("qkv.weight").shape) == (24, 16)
    assert tuple(pruned.get_parameter("proj.weight").shape) == (16, 8)
    assert tuple(pruned.get_parameter("fc1.weight").shape) == (12, 16)


def test_ignore_and_leaf_modules_apply_to_exported_graphs():
    model, x = build("residual_shape_if")
    pruned = sp.prune(model, x, ratio=0.5, ignore=[model.down])
    assert pruned.get_parameter("down.weight").shape[0] == 16
    assert pruned.get_parameter("conv1.weight").shape[0] == 4
    graph = sp.trace(model, x, leaf_modules=[model.stem])
    assert any("leaf module 'stem" in e.reason for e in graph.frozen())
    params = {m.qualname for g in graph.groups() for m in g.params}
    assert "conv1.weight" in params and "stem.0.weight" not in params
    sp.prune(model, x, ratio=0.5, leaf_modules=[model.stem])


def test_nested_inputs_keyword_inputs_and_dict_outputs():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, pair, scale=None):
            x = self.a(pair[0]) + self.b(pair[1]["y"])
            for _ in range(int(x.shape[0])):  # fx cannot do this
                x = F.relu(x)
            return {"out": self.c(x) * scale, "aux": None}

    torch.manual_seed(0)
    model = Nested().double().eval()
    inputs = {"pair": (img(3, 4), {"y": img(3, 4)}), "scale": img(1)}
    graph = sp.trace(model, inputs)
    nodes = graph.graph_module.graph.nodes
    assert [n.target for n in nodes if n.op == "placeholder"] == ["pair", "scale"]
    pruned = sp.prune(model, inputs, ratio=0.5)
    assert pruned.get_parameter("a.weight").shape[0] == 4
    with torch.no_grad():
        out = pruned(**inputs)
    assert set(out) == {"out", "aux"} and out["aux"] is None and out["out"].shape == (3, 2)
    assert_rule(model, inputs, ratio=0.5, onnx=False)


def test_neither_fx_nor_export_raises_naming_the_module():
    model = Branchy()  # branches on a tensor's value in module 'inner'
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sp.TraceError) as info:
        sp.prune(model, torch.randn(2, 3, 9, 9), ratio=0.5)
    msg = str(info.value)
    assert "module 'inner'" in msg and "if x.sum() > 0" in msg and "leaf_modules" in msg
    assert "torch.export fallback failed" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_load_of_an_exported_model(tmp_path):
    model, x = build("int_sizes")
    pruned = sp.prune(model, x, ratio=0.5)
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in pruned.graph.nodes)
    sp.save(pruned, str(tmp_path / "m.sp"))
    again = sp.load(str(tmp_path / "m.sp"))
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
    assert again.state_dict().keys() == pruned.state_dict().keys()


def test_reports_and_mac_targets_work_on_exported_graphs():
    model, x = build("residual_shape_if")
    pruned = sp.prune(model, x, target_macs=0.5)
    rep = sp.report(model, pruned, x)
    assert rep.macs_before > 0 and rep.macs_kept <= 0.6
    assert rep.params_after < rep.params_before


def test_bn_scale_importance_sees_the_norm_roles():
    model, x = build("residual_shape_if")
    graph = sp.trace(model, x)
    roles = {m.qualname: m.role for g in graph.groups() for m in g.params}
    assert roles["bn1.weight"] == "norm" and roles["bn1.running_var"] == "stat"
    assert roles["conv1.weight"] == "out"
    sp.prune(model, x, ratio=0.5, importance="bn_scale")


class _ShapeBranchBN(torch.nn.Module):
    """fx cannot capture it (a branch on a size); its forward makes a tensor of the width of
    conv's output, so only the pruned graph computes the pruned model."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * 2.0
        y = self.conv(x) + torch.ones(1, 8, 1, 1)
        return self.head(self.drop(torch.relu(self.bn(y))))


def test_an_exported_graph_fine_tunes_like_the_original():
    """BatchNorm and Dropout come back as module calls: .train() uses batch statistics,
    updates the running ones and drops activations, as the original does; .eval() is exact."""
    torch.manual_seed(0)
    model, x = _ShapeBranchBN().eval(), torch.randn(4, 3, 8, 8)
    model.bn.running_mean.uniform_(-1, 1)
    pruned = sp.prune(model, x, ratio=0.5)
    assert isinstance(pruned, torch.fx.GraphModule)  # the forward's literal 8 had to change
    bn = [m for m in pruned.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 1 and bn[0].num_features == 4
    assert any(isinstance(m, torch.nn.Dropout) for m in pruned.modules())
    before = bn[0].running_mean.clone()
    pruned.train()
    torch.manual_seed(1)
    a = pruned(x)
    torch.manual_seed(2)
    b = pruned(x)
    assert not torch.equal(a, b)  # dropout is on
    assert not torch.equal(bn[0].running_mean, before)  # batch statistics were taken
    # the original's own training steps give the same running statistics on the kept channels
    pruned.eval()
    w = pruned.get_parameter("conv.weight")
    kept = [i for i in range(8) if any(torch.equal(model.conv.weight[i], w[j])
                                       for j in range(w.shape[0]))]
    assert len(kept) == 4
    model.train()
    with torch.no_grad():
        model(x)
        model(x)
    model.eval()
    assert torch.allclose(model.bn.running_mean[kept], bn[0].running_mean, atol=1e-6)
    assert torch.allclose(model.bn.running_var[kept], bn[0].running_var, atol=1e-6)
    loss = pruned(x).square().mean()
    loss.backward()
    assert pruned.get_parameter("conv.weight").grad is not None


def test_the_strict_attempt_has_a_time_budget(monkeypatch):
    """A strict export that runs too long (minutes in sympy on a torchvision detector, then a
    segfault) is abandoned, and the next attempt runs."""
    import time

    from structprune.graph import export_capture

    with pytest.raises(export_capture._OutOfTime):
        with export_capture._time_budget(0.2):
            end = time.time() + 5
            while time.time() < end:
                pass
    calls = []

    def slow_strict(*a, **k):
        calls.append("strict")
        end = time.time() + 5
        while time.time() < end:
            pass

    monkeypatch.setattr(export_capture, "STRICT_EXPORT_SECONDS", 0.3)
    real = torch.export.export

    def export(model, args, kwargs=None, *, strict=False, dynamic_shapes=None, **kw):
        if strict:
            return slow_strict()
        if dynamic_shapes is not None:
            raise RuntimeError("non-strict with open sizes fails")
        return real(model, args, kwargs, strict=False)

    monkeypatch.setattr(torch.export, "export", export)
    model, x = build("int_sizes")
    t = time.time()
    gm = sp.trace(model, x).graph_module
    assert calls == ["strict"] and time.time() - t < 4
    assert gm.meta["structprune_capture"] == "export"


def test_guards_with_a_max_of_sizes_are_checked_not_specialised():
    """timm's VGG pools to ``max(7, W // 32)``: export's guards read ``torch.sym_max``. They
    are checked at call time (the batch stays open; before, the capture fell back to the
    example's sizes and the pruned model refused batch 3)."""
    import ast

    from structprune.graph.inputs import _guard_node, guard_checkable

    code = "torch.sym_max(1, L['x'].size()[3] // 16) > torch.sym_min(1, L['x'].size()[2])"
    assert guard_checkable(code)

    def holds(w):
        return _guard_node(ast.parse(code, mode="eval").body, {"x": torch.zeros(1, 3, 8, w)},
                           lambda fn, *a: fn(*a))

    assert holds(64) and not holds(16)
    assert not guard_checkable("__import__('os').getcwd() == 1")


class CeilPatches(nn.Module):
    """MobileViT-style: pad the feature map up to whole 2x2 patches (``math.ceil(H / 2)``),
    then fold the patches into the batch; export's guards read ``math.ceil`` and ``/``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x).relu()
        b, c, h, w = x.shape
        nh, nw = math.ceil(h / 2) * 2, math.ceil(w / 2) * 2
        if nh != h or nw != w:
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        p = x.reshape(b, c, nh // 2, 2, nw // 2, 2).permute(0, 3, 5, 2, 4, 1)
        p = self.mix(p).relu().permute(0, 5, 3, 1, 4, 2).reshape(b, c, nh, nw)
        return self.out(p).mean((2, 3))


def test_guards_with_ceil_and_division_keep_the_sizes_open():
    """Guards such as ``math.ceil(H / 2) * 2 != H`` (timm's MobileViT, MViTv2's pooling
    ratios ``a / b >= 1.0``) are checked at call time: the pruned model runs at other batch
    and image sizes, equal to its masked original, and refuses only the branch it did not take
    (odd sizes), naming the input."""
    import ast

    from structprune.graph.inputs import _guard_node, guard_checkable

    code = "((1 + (L['x'].size()[2] - 1) // 16) / (1 + (L['x'].size()[2] - 1) // 4)) < 1.0"
    assert guard_checkable(code) and guard_checkable(
        "math.ceil((L['x'].size()[3] - 1) / 2) != 3")
    assert _guard_node(ast.parse(code, mode="eval").body, {"x": torch.zeros(1, 3, 64, 64)},
                       lambda fn, *a: fn(*a))

    torch.manual_seed(0)
    model = randomize_(CeilPatches()).double().eval()
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    x = img(2, 3, 8, 12)
    pruner = sp.Pruner(model, x, ratio=0.5)
    plan = pruner.plan()
    pruned = pruner.apply(plan)
    assert pruned.meta["structprune_capture"] == "export"
    assert pruned.conv.weight.shape[0] == 4
    for other in (x, img(3, 3, 8, 12), img(4, 3, 10, 6), img(3, 3, 16, 16)):
        assert max_rel_diff(pruned(other), masked_output(pruner.graph, plan, other)) < 1e-12
    with pytest.raises(AssertionError, match="captured by torch.export for inputs with"):
        pruned(img(2, 3, 9, 12))


class DropsInAList(nn.Module):
    """timm Twins: dropout modules in a ModuleList that holds no parameters, zipped."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)])
        self.drops = nn.ModuleList([nn.Dropout(0.5), nn.Dropout(0.5)])

    def forward(self, x):
        for conv, drop in zip(self.convs, self.drops):
            x = drop(conv(x).relu())
            if x.shape[-1] % 2:  # fx cannot branch on a size
                x = x[..., :-1]
        return x.mean((2, 3))


def test_dropout_in_a_list_of_parameterless_modules_is_restored():
    torch.manual_seed(0)
    model = randomize_(DropsInAList()).double().eval()
    x = img(2, 3, 8, 8)
    gm = sp.trace(model, x).graph_module
    assert gm.meta["structprune_capture"] == "export"
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"drops.0", "drops.1"}
    pruned = assert_rule(model, x, ratio=0.5, onnx=False)
    pruned.train()
    torch.manual_seed(1)
    assert (pruned(x) != pruned(x)).any()  # dropout is live in train mode


class BatchTimesHeads(nn.Module):
    """SAM-style attention: q, k, v reshaped to ``(B * heads, T, D)``; the branch on T makes
    fx fail, so export captures it with the batch open (``B * 4`` is a traced size)."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        if t % 2:
            x, t = x[:, :-1], t - 1
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, t, -1).unbind(0)
        scores = (q @ k.transpose(-2, -1))[:, :, :, None]  # aten.slice to the end of B * heads
        out = scores[..., 0].softmax(-1) @ v
        return self.proj(out.view(b, self.heads, t, -1).permute(0, 2, 1, 3).reshape(b, t, -1))


def test_a_traced_size_holding_the_batch_is_scaled_not_baked():
    """Pruning heads changes ``B * 4`` to ``B * 2``: the size is rewritten as ``B * 4 // 2``,
    not as the example's number (which ran only at batch 2 and was silently wrong at batch 3),
    and a slice to the end of that dim stays one (timm's SAM failed at batch 3)."""
    torch.manual_seed(0)
    model = randomize_(BatchTimesHeads()).double().eval()
    x = img(2, 6, 16)
    pruner = sp.Pruner(model, x, ratio=0.5, ignore=[model.proj])
    plan = pruner.plan()
    pruned = pruner.apply(plan)
    assert pruned.meta["structprune_capture"] == "export"
    assert pruned.qkv.weight.shape[0] == 24  # 2 of 4 heads
    for other in (x, img(3, 6, 16), img(5, 8, 16)):
        assert max_rel_diff(pruned(other), masked_output(pruner.graph, plan, other)) < 1e-12


def test_the_strict_attempt_leaves_the_example_tensors_unmarked(monkeypatch):
    """TorchDynamo marks the tensors a strict export is given as dynamic; it gets copies, so
    the user's example tensors stay as they were and the last attempt (the example's sizes)
    is not turned back into an open-size export (timm's CPUBone then failed in sympy)."""
    real = torch.export.export
    seen = []

    def export(model, args, kwargs=None, *, strict=False, dynamic_shapes=None, **kw):
        if strict:
            seen.append(args[0])
            torch._dynamo.mark_dynamic(args[0], 0)  # what an interrupted strict run leaves
            raise RuntimeError("strict fails")
        if dynamic_shapes is not None:
            raise RuntimeError("non-strict with open sizes fails")
        return real(model, args, kwargs, strict=False)

    monkeypatch.setattr(torch.export, "export", export)
    model, x = build("int_sizes")
    gm = sp.trace(model, x).graph_module
    assert gm.meta["structprune_capture"] == "export"
    assert seen and seen[0] is not x and torch.equal(seen[0], x)
    assert not any(k.startswith("_dynamo") for k in vars(x))
