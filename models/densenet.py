"""Small DenseNet-BC for CIFAR, from "Densely Connected Convolutional Networks" (Huang et al.,
CVPR 2017).

Each bottleneck layer is BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 and concatenates its ``growth_rate``
new maps onto its input; transitions halve channels (compression 0.5) and average-pool.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(F.relu(self.bn(x)))
        return F.avg_pool2d(out, 2)


class DenseNet(nn.Module):
    def __init__(self, nblocks: tuple[int, ...] = (4, 4, 4), growth_rate: int = 12,
                 reduction: float = 0.5, num_classes: int = 10) -> None:
        super().__init__()
        num_planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, num_planes, kernel_size=3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, nblock in enumerate(nblocks):
            layers = []
            for _ in range(nblock):
                layers.append(Bottleneck(num_planes, growth_rate))
                num_planes += growth_rate
            stages.append(nn.Sequential(*layers))
            if i != len(nblocks) - 1:
                out_planes = int(math.floor(num_planes * reduction))
                stages.append(Transition(num_planes, out_planes))
                num_planes = out_planes
        self.dense = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(num_planes)
        self.linear = nn.Linear(num_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.dense(out)
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def build(num_classes: int = 10, width: float = 1.0,
          nblocks: tuple[int, ...] = (4, 4, 4)) -> nn.Module:
    """Build a DenseNet-BC; ``width`` scales the growth rate (12 at 1.0)."""
    growth_rate = max(1, int(round(12 * width)))
    return DenseNet(nblocks=nblocks, growth_rate=growth_rate, num_classes=num_classes)


def example_inputs(batch: int = 2) -> tuple[Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)
