"""A YOLOv8-shaped detector in plain PyTorch, laid out as Ultralytics' ``yolov8.yaml``.

- ``Conv``: a bias-free conv, BatchNorm and SiLU.
- ``C2f``: a 1x1 conv whose output is split in two with ``chunk(2)``; a chain of bottlenecks on
  the second half, and every intermediate result concatenated into a 1x1 conv.
- ``SPPF``: three chained 5x5 max pools, concatenated.
- a PAN neck (top-down upsample + concat, bottom-up strided conv + concat) to three levels
  (strides 8, 16, 32).
- a decoupled head per level (a box branch with ``4 * 16`` distribution bins and a class branch),
  the levels' outputs concatenated; the box bins decoded by DFL (a softmax over the 16 bins,
  then a 1x1 conv with the fixed weights ``0..15``, ``requires_grad=False``: the expected bin) and
  turned into ``xywh`` boxes around anchor points computed from the feature sizes.

The output is ``[batch, 4 + num_classes, anchors]`` (boxes in pixels, class probabilities), as
Ultralytics' ``Detect`` returns in eval mode (without its training-mode raw outputs).

Sizes: ``size="n"`` (depth 0.33, width 0.25) or ``"s"`` (0.33, 0.50), or ``depth=``/``width=``
multipliers directly. Input sides must be multiples of 32. Everything is written so that
``torch.fx`` can trace it (no unpacking of shapes).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

SIZES = {"n": (0.33, 0.25), "s": (0.33, 0.50)}
STRIDES = (8, 16, 32)


class Conv(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convolutions: split in two with ``chunk``, concat everything."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        halves = self.cv1(x).chunk(2, 1)
        y = [halves[0], halves[1]]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: the expected bin of a softmax over ``c1`` bins, as a
    1x1 conv with the fixed weights ``0..c1-1`` (not trained)."""

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: Tensor) -> Tensor:
        b, a = x.shape[0], x.shape[2]
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats: list[Tensor], strides: tuple[int, ...],
                 offset: float = 0.5) -> tuple[Tensor, Tensor]:
    """Anchor points ``[A, 2]`` (cell centres, in feature cells) and their strides ``[A, 1]``."""
    points, stride_list = [], []
    for f, stride in zip(feats, strides):
        h, w = f.shape[2], f.shape[3]
        sx = torch.arange(w, device=f.device, dtype=f.dtype) + offset
        sy = torch.arange(h, device=f.device, dtype=f.dtype) + offset
        grid = torch.meshgrid(sy, sx, indexing="ij")
        gy, gx = grid[0], grid[1]
        points.append(torch.stack((gx, gy), -1).view(-1, 2))
        stride_list.append(torch.ones_like(gx).view(-1, 1) * stride)
    return torch.cat(points), torch.cat(stride_list)


def dist2bbox(distance: Tensor, anchor_points: Tensor, dim: int = 1) -> Tensor:
    """``(left, top, right, bottom)`` distances from anchor points to ``xywh`` boxes."""
    parts = distance.chunk(2, dim)
    lt, rb = parts[0], parts[1]
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)


class Detect(nn.Module):
    """Decoupled head: per level a box branch (``4 * reg_max`` bins) and a class branch."""

    def __init__(self, nc: int, ch: tuple[int, ...], reg_max: int = 16) -> None:
        super().__init__()
        self.nc, self.reg_max, self.no = nc, reg_max, nc + 4 * reg_max
        c2 = max(16, ch[0] // 4, reg_max * 4)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3),
                                               nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3),
                                               nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(reg_max)

    def forward(self, xs: list[Tensor]) -> Tensor:
        outs = [torch.cat((b(x), c(x)), 1) for x, b, c in zip(xs, self.cv2, self.cv3)]
        batch = outs[0].shape[0]
        x_cat = torch.cat([o.view(batch, self.no, -1) for o in outs], 2)
        split = x_cat.split((self.reg_max * 4, self.nc), 1)
        box, cls = split[0], split[1]
        anchors, strides = make_anchors(xs, STRIDES)
        dbox = dist2bbox(self.dfl(box), anchors.transpose(0, 1).unsqueeze(0)) \
            * strides.transpose(0, 1)
        return torch.cat((dbox, cls.sigmoid()), 1)


class YOLOv8(nn.Module):
    def __init__(self, num_classes: int = 80, depth: float = 0.33, width: float = 0.25,
                 max_channels: int = 1024) -> None:
        super().__init__()

        def ch(c: int) -> int:  # width multiple, rounded up to a multiple of 8
            return int(math.ceil(min(c, max_channels) * width / 8) * 8)

        def n(k: int) -> int:
            return max(round(k * depth), 1)

        c1, c2, c3, c4, c5 = ch(64), ch(128), ch(256), ch(512), ch(1024)
        self.stem = Conv(3, c1, 3, 2)                                        # P1/2
        self.stage1 = nn.Sequential(Conv(c1, c2, 3, 2), C2f(c2, c2, n(3), True))   # P2/4
        self.stage2 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3, n(6), True))   # P3/8
        self.stage3 = nn.Sequential(Conv(c3, c4, 3, 2), C2f(c4, c4, n(6), True))   # P4/16
        self.stage4 = nn.Sequential(Conv(c4, c5, 3, 2), C2f(c5, c5, n(3), True),
                                    SPPF(c5, c5, 5))                         # P5/32
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C2f(c5 + c4, c4, n(3))          # top-down to P4
        self.td3 = C2f(c4 + c3, c3, n(3))          # top-down to P3 (out)
        self.down3 = Conv(c3, c3, 3, 2)
        self.bu4 = C2f(c3 + c4, c4, n(3))          # bottom-up P4 (out)
        self.down4 = Conv(c4, c4, 3, 2)
        self.bu5 = C2f(c4 + c5, c5, n(3))          # bottom-up P5 (out)
        self.detect = Detect(num_classes, (c3, c4, c5))

    def forward(self, x: Tensor) -> Tensor:
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        t4 = self.td4(torch.cat((self.up(p5), p4), 1))
        o3 = self.td3(torch.cat((self.up(t4), p3), 1))
        o4 = self.bu4(torch.cat((self.down3(o3), t4), 1))
        o5 = self.bu5(torch.cat((self.down4(o4), p5), 1))
        return self.detect([o3, o4, o5])


def build(num_classes: int = 10, size: str = "n", depth: float | None = None,
          width: float | None = None) -> nn.Module:
    """A YOLOv8 of ``size`` ``"n"`` or ``"s"`` (or explicit ``depth``/``width`` multipliers)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    d, w = SIZES[size]
    return YOLOv8(num_classes, d if depth is None else depth, w if width is None else width)


def example_inputs(batch: int = 2, size: int = 64) -> tuple[Tensor, ...]:
    """A batch of ``size x size`` images (a multiple of 32)."""
    return (torch.randn(batch, 3, size, size),)
