"""Diagnostics: where a capture failed in model code installed beside torch, what a group split
by ``chunk`` kept in the report, and which frozen entries matter (graph.frozen())."""

import torch
import torch.nn as nn

import structprune as sp
from structprune import diagnostics


def test_user_frame_tells_a_package_beside_torch_from_torch(tmp_path, monkeypatch):
    # torchvision lives at .../site-packages/torchvision: it shares the prefix
    # .../site-packages/torch, but it is not torch.
    torch_dir = tmp_path / "site-packages" / "torch"
    vision = tmp_path / "site-packages" / "torchvision" / "ops.py"
    inside = torch_dir / "nn" / "functional.py"
    vision.parent.mkdir(parents=True)
    inside.parent.mkdir(parents=True)
    vision.write_text("def nms(f):\n    return f()\n")
    inside.write_text("def boom():\n    raise ValueError('deep in torch')\n")
    monkeypatch.setattr(diagnostics, "_TORCH_DIR", str(torch_dir))
    ns_v, ns_t = {}, {}
    exec(compile(vision.read_text(), str(vision), "exec"), ns_v)
    exec(compile(inside.read_text(), str(inside), "exec"), ns_t)
    try:
        ns_v["nms"](ns_t["boom"])
    except ValueError as exc:
        where = diagnostics.user_frame(exc)
    assert where is not None and where.startswith(f"{vision}:2:"), where
    assert "return f()" in where


class C2f(nn.Module):  # YOLOv8's block: a 1x1 conv split in two halves by chunk
    def __init__(self, c=32, n=1):
        super().__init__()
        self.cv1 = nn.Conv2d(c, c, 1)
        self.m = nn.ModuleList(nn.Conv2d(c // 2, c // 2, 3, padding=1) for _ in range(n))
        self.cv2 = nn.Conv2d((2 + n) * c // 2, c, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]).relu())
        return self.cv2(torch.cat(y, 1))


def test_report_of_groups_split_by_chunk_shows_what_each_kept():
    m = nn.Sequential(nn.Conv2d(3, 32, 3), C2f(), nn.Conv2d(32, 8, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    pruned = sp.prune(m, x, ratio=0.5)
    assert pruned.get_parameter("1.cv1.weight").shape[0] == 16  # both halves 16 -> 8
    rep = sp.report(m, pruned, x)
    halves = [g for g in rep.groups if "1.cv1" in g.modules and "1.cv2" in g.modules]
    assert [(g.units_before, g.units_after) for g in halves] == [(16, 8), (16, 8)], rep.table()
    assert all(g.units_after == g.units_before // 2 for g in rep.groups), rep.table()
    assert "16->8" in rep.table() and "->0 " not in rep.table()


class RMSNorm(nn.Module):  # hand-written, as Llama's
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TinyDecoder(nn.Module):
    def __init__(self, vocab=50, d=16, hidden=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = RMSNorm(d)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.qk = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)
        causal = pos[None, :] > pos[:, None]  # a mask: carries no prunable dim
        q = self.qk(self.norm(h))
        scores = (q @ h.transpose(1, 2)).masked_fill(causal, float("-inf")).softmax(-1)
        h = h + scores @ h
        h = h + self.down(self.up(self.norm(h)).relu())
        return self.head(h)


def test_frozen_lists_what_blocks_a_prunable_dim_first_and_names_the_module():
    m = TinyDecoder().eval()
    g = sp.trace(m, torch.randint(0, 50, (2, 6)))
    entries = g.frozen()
    blocking = [e for e in entries if e.blocks]
    harmless = [e for e in entries if not e.blocks]
    assert entries == blocking + harmless  # blocking entries first
    assert any(e.op == "torch.arange" for e in harmless), entries
    assert not any(e.op == "torch.arange" for e in blocking), entries
    # the hidden width is held by the hand-written RMSNorm's mean, named with its module
    means = [e for e in blocking if "mean" in e.op]
    if means:  # (once mean over a prunable dim is exact, it no longer freezes anything)
        assert all(e.module == "norm" and "in 'norm'" in repr(e) for e in means), means
    else:
        assert not g.is_frozen(sp.rules.Space.param("norm.weight", 0))
    # the group of the MLP's hidden units is prunable and not listed as frozen
    assert any("up" in {m.module for m in grp.params} for grp in g.groups())
