"""Pruning in parts: a model that cannot be captured whole (a detector-shaped model that loops
over a list of images and runs a data-dependent NMS) is pruned part by part (structprune.partial).
No torchvision: the detector is built here."""
import copy
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
import structprune.testing  # noqa: F401  (sp.testing.randomize_)
from structprune.errors import PlanError, StructpruneWarning, TraceError
from structprune.graph.shapes import placeholder_values
from structprune.oracle import MaskedInterpreter, flatten_outputs
from structprune.partial import parts_of


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 2)
        self.stage1 = nn.Sequential(conv_bn(8, 16, 2), conv_bn(16, 16))
        self.stage2 = nn.Sequential(conv_bn(16, 24, 2), conv_bn(24, 24))

    def forward(self, x):
        c1 = self.stage1(self.stem(x))
        return {"p1": c1, "p2": self.stage2(c1)}


class Neck(nn.Module):  # FPN-like: laterals, top-down add, output convs
    def __init__(self, width=16):
        super().__init__()
        self.lat1, self.lat2 = nn.Conv2d(16, width, 1), nn.Conv2d(24, width, 1)
        self.out1, self.out2 = nn.Conv2d(width, width, 3, 1, 1), nn.Conv2d(width, width, 3, 1, 1)

    def forward(self, feats):
        top = self.lat2(feats["p2"])
        low = self.lat1(feats["p1"]) + F.interpolate(top, size=feats["p1"].shape[-2:])
        return [self.out1(low), self.out2(top)]


class Head(nn.Module):  # shared over levels: called once per level
    def __init__(self, width=16, hidden=24, classes=3):
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(width, hidden, 3, 1, 1), nn.BatchNorm2d(hidden),
                                   nn.ReLU(), nn.Conv2d(hidden, hidden, 3, 1, 1), nn.ReLU())
        self.cls = nn.Conv2d(hidden, classes, 1)
        self.box = nn.Conv2d(hidden, 4, 1)

    def forward(self, x):
        t = self.tower(x)
        return self.cls(t), self.box(t)


def nms(boxes, scores, thr=0.5):
    """Greedy NMS in plain torch: a data-dependent loop."""
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        area = lambda b: (b[..., 2:] - b[..., :2]).prod(-1)  # noqa: E731
        iou = inter / (area(boxes[i]) + area(boxes[rest]) - inter)
        order = rest[iou <= thr]
    return torch.stack(keep) if keep else order


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.neck, self.head = Backbone(), Neck(), Head()

    def forward(self, images):
        images = [img for img in images if img.numel() and bool(img.abs().amax() > 0)]
        h = max(img.shape[-2] for img in images)
        w = max(img.shape[-1] for img in images)
        batch = torch.stack([F.pad(img, (0, w - img.shape[-1], 0, h - img.shape[-2]))
                             for img in images])
        feats = self.neck(self.backbone(batch))
        outs = [self.head(f) for f in feats]
        results = []
        for b in range(len(images)):
            scores, boxes = [], []
            for (cls, box), f in zip(outs, feats):
                s = cls[b].sigmoid().amax(0).flatten()
                ys, xs = torch.meshgrid(torch.arange(f.shape[-2]), torch.arange(f.shape[-1]),
                                        indexing="ij")
                centre = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 4).float()
                boxes.append(centre + box[b].permute(1, 2, 0).reshape(-1, 4).tanh() * 2
                             + torch.tensor([-1.0, -1.0, 1.0, 1.0]))
                scores.append(s)
            s, bx = torch.cat(scores), torch.cat(boxes)
            top = (s > 0.3).nonzero().flatten()
            keep = top[nms(bx[top], s[top])]
            results.append({"boxes": bx[keep], "scores": s[keep]})
        return results


def images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def detector():
    m = TinyDetector()
    sp.testing.randomize_(m)
    return m.eval()


def prune_in_parts(m, x, **kw):
    with pytest.warns(StructpruneWarning, match="pruned in parts"):
        return sp.prune(m, (x,), **kw)


def masked_copy(model, parts):
    """The original with each pruned part replaced by its masked original (the oracle)."""

    class Masked(nn.Module):
        def __init__(self, plan):
            super().__init__()
            self.plan = plan

        def forward(self, *a, **k):
            gm = self.plan.graph.graph_module
            interp = MaskedInterpreter(gm, self.plan.activation_masks_all())
            return interp.run(*placeholder_values(gm, a, k))

    out = copy.copy(model)
    out._modules = dict(model._modules)
    for p in parts.parts:
        if p.pruned:
            assert len(p.plans) == 1
            parent, _, attr = p.path.rpartition(".")
            holder = out
            if parent:  # copy the path down to the part, sharing everything else
                for name in parent.split("."):
                    child = copy.copy(holder._modules[name])
                    child._modules = dict(child._modules)
                    holder._modules[name] = child
                    holder = child
            holder._modules[attr] = Masked(p.plans[0])
    return out


@pytest.fixture(scope="module")
def pruned_detector():
    torch.manual_seed(0)
    m = detector()
    x = images([(48, 64), (40, 56)])
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.warns(StructpruneWarning, match="pruned in parts"):
        pruner = sp.Pruner(m, (x,), ratio=0.5)
        pruned = pruner.run()
    return m, x, state, pruner, pruned


def test_detector_pruned_in_parts_runs_on_new_images_and_equals_masked_original(
        pruned_detector):
    m, x, state, _, pruned = pruned_detector
    # the original is unchanged
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    parts = parts_of(pruned)
    by_path = {p.path: p for p in parts.parts}
    assert set(by_path) == {"backbone", "neck", "head"}
    assert by_path["head"].calls == 2  # once per level, at two sizes
    assert all(p.pruned and p.oracle_diff is not None and p.oracle_diff < 1e-4
               for p in parts.parts)
    assert sum(t.numel() for t in pruned.parameters()) < 0.6 * sum(
        t.numel() for t in m.parameters())
    assert pruned.head.tower[0].out_channels == 12 and pruned.backbone.stem[0].out_channels == 4
    assert type(pruned) is TinyDetector and pruned is not m
    # the pruned detector equals the masked original, on other images (sizes, count)
    oracle = masked_copy(m, parts)
    for sizes in ([(32, 48)], [(64, 40), (56, 72), (48, 48)]):
        new = images(sizes, seed=1)
        with torch.no_grad():
            got, want = pruned(new), oracle(new)
        assert len(got) == len(sizes)
        for a, b in zip(got, want):
            assert a["boxes"].shape == b["boxes"].shape
            torch.testing.assert_close(a["scores"].sort().values, b["scores"].sort().values,
                                       atol=1e-5, rtol=1e-4)
            # equal scores may come out of NMS in either order: match boxes as sets
            dist = (a["boxes"][:, None] - b["boxes"][None]).abs().amax(-1)
            assert dist.min(1).values.max() < 1e-3 and dist.min(0).values.max() < 1e-3


def test_report_and_applied_say_what_was_pruned_in_parts(pruned_detector):
    m, x, _, pruner, pruned = pruned_detector
    assert pruner.parts is parts_of(pruned) and "pruned in parts" in pruner.applied.reason
    rep = sp.report(m, pruned, (x,))
    text = str(rep)
    assert "part 'backbone'" in text and "part 'head' (Head, fx, 2 calls)" in text
    assert rep.macs_after < 0.6 * rep.macs_before
    assert rep.params_after == sum(t.numel() for t in pruned.parameters())
    mods = {mod for g in rep.groups for mod in g.modules}
    assert "head.tower.0" in mods and "backbone.stem.0" in mods
    assert all(0 < g.units_after < g.units_before for g in rep.groups)


def test_torch_save_round_trips_and_sp_save_says_what_to_do(pruned_detector):
    _, _, _, _, pruned = pruned_detector
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pt")
        torch.save(pruned, path)
        back = torch.load(path, weights_only=False)
        with pytest.raises(sp.io.SerializationError, match="pruned in parts.*torch.save"):
            sp.save(pruned, os.path.join(d, "m.sp"), example_inputs=(images([(48, 64)]),))
    new = images([(40, 40)], seed=3)
    with torch.no_grad():
        a, b = pruned(new), back(new)
    assert all(torch.equal(p, q) for p, q in zip(flatten_outputs(a), flatten_outputs(b)))


class Branchy(nn.Module):  # fx cannot trace the shape branch; export guards on it
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 24, 1), nn.Conv2d(24, 16, 1)

    def forward(self, x):
        y = self.a(x).relu()
        if x.shape[-1] > 8:
            y = y * 2
        return self.b(y)


def test_part_whose_calls_its_capture_cannot_serve_is_refused_and_ratio_dict_and_ignore():
    m = detector()
    m.head.tower[0] = Branchy()  # the head runs at widths 16 and 8: the branch goes both ways
    m.head.tower[1] = nn.BatchNorm2d(16)
    m.head.tower[3] = nn.Conv2d(16, 24, 3, 1, 1)
    x = images([(48, 64)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = sp.prune(m, (x,), ratio={m.backbone: 0.5, m.head: 0.25}, ignore=[m.neck])
    said = [str(w.message) for w in caught]
    assert any("part 'head' (Head) was not pruned" in t and "call 2 of 2" in t for t in said)
    assert any("pruned in parts" in t for t in said)
    kept = {path: why for path, _, why in parts_of(pruned).kept}
    assert kept["neck"] == "ignored by the user"
    assert kept["head"].startswith("refused: ") and "submodules were tried" in kept["head"]
    assert kept["head.tower"].startswith("refused: ")
    assert pruned.neck.out1.out_channels == 16 and pruned.backbone.stem[0].out_channels == 4
    # inside the refused head, what captures alone is pruned: tower.3's input and output are
    # the part's own, so nothing there; the Branchy (one call per level) is refused too
    assert isinstance(pruned.head.tower[0], Branchy)
    with torch.no_grad():
        assert len(pruned(images([(64, 96), (32, 32)], seed=2))) == 2


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if (x.sum() > 0).item():
            return self.lin(x)
        return x


def test_not_capturable_anywhere_raises_the_capture_error():
    class Leafy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            if (x.sum() > 0).item():
                return x * self.w
            return x

    with pytest.raises(TraceError, match="No submodule captures on its own"):
        sp.prune(Leafy(), torch.ones(2, 4), ratio=0.5)


def test_settings_for_the_whole_model_are_refused_in_parts():
    with pytest.raises(PlanError, match="pruned in parts, where target_macs"):
        sp.prune(Opaque(), torch.ones(2, 4), target_macs=0.5)
    data = [(torch.ones(2, 4), torch.ones(2, 4))]
    with pytest.raises(PlanError, match="data=/loss_fn="):
        sp.prune(Opaque(), torch.ones(2, 4), importance="taylor", data=data,
                 loss_fn=nn.functional.mse_loss)


def test_part_that_only_sees_empty_tensors_is_kept_with_the_reason():
    class Refiner(nn.Module):  # a second stage run on the detections, of which there are none
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
            self.refine = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x):
            y = self.body(x)
            z = self.refine(y[y.sum(1) > 1e9])
            return (y, z) if bool(z.numel()) else (y, None)

    m = Refiner().eval()
    pruned = prune_in_parts(m, torch.randn(3, 4), ratio=0.5)
    kept = {path: why for path, _, why in parts_of(pruned).kept}
    assert "empty tensor" in kept["refine"] and "empty tensor" in kept["refine.0"]
    assert pruned.body[0].out_features == 4 and pruned.refine[0].out_features == 8


class Stages(nn.Module):
    """Twins-shaped: the forward zips ModuleLists (never calling them) and loops on a value."""

    def __init__(self):
        super().__init__()
        self.embeds = nn.ModuleList([conv_bn(3, 8, 2), conv_bn(8, 12, 2)])
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(),
                                                   nn.Conv2d(16, 8, 1)),
                                     nn.Sequential(nn.Conv2d(12, 24, 1), nn.ReLU(),
                                                   nn.Conv2d(24, 12, 1))])

    def forward(self, x):
        for embed, block in zip(self.embeds, self.blocks):
            x = embed(x)
            while bool(x.abs().amax() > 100):  # a loop on a value: neither fx nor export
                x = x / 2
            x = x + block(x)
        return x.mean((2, 3))


def test_containers_the_forward_only_indexes_are_searched_for_parts():
    torch.manual_seed(0)
    m = sp.testing.randomize_(Stages()).eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = sp.Pruner(m, (x,), ratio=0.5)
    with pytest.warns(StructpruneWarning, match="pruned in parts"):
        pruned = pruner.run()
    parts = {p.path: p for p in pruner.parts.parts}
    assert {"blocks.0", "blocks.1"} <= set(parts)
    assert parts["blocks.0"].pruned and pruned.blocks[0][0].out_channels == 8
    kept = {path: why for path, _, why in pruner.parts.kept}
    assert "its submodules were tried instead" in kept["blocks"]
    oracle = masked_copy(m, pruner.parts)
    with torch.no_grad():
        for y in (x, torch.randn(3, 3, 24, 20)):
            torch.testing.assert_close(pruned(y), oracle(y), atol=1e-5, rtol=1e-4)
