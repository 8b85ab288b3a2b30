"""ResNeXt for CIFAR, from "Aggregated Residual Transformations for Deep Neural Networks"
(Xie et al., CVPR 2017).

Bottleneck blocks 1x1 -> grouped 3x3 (``cardinality`` groups) -> 1x1 expand by 2, with 1x1 conv +
BN shortcuts where the shape changes. ``num_blocks=(3, 3, 3), cardinality=8, bottleneck_width=64``
is ResNeXt-29 8x64d; the default is a shallow, narrow copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class Block(nn.Module):
    expansion = 2

    def __init__(self, in_planes: int, cardinality: int, bottleneck_width: int, stride: int = 1) -> None:
        super().__init__()
        group_width = cardinality * bottleneck_width
        self.conv1 = nn.Conv2d(in_planes, group_width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.conv2 = nn.Conv2d(group_width, group_width, kernel_size=3, stride=stride, padding=1,
                               groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(group_width)
        self.conv3 = nn.Conv2d(group_width, self.expansion * group_width, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * group_width)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * group_width:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * group_width, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * group_width),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNeXt(nn.Module):
    def __init__(self, num_blocks: tuple[int, ...], cardinality: int, bottleneck_width: int,
                 num_classes: int = 10, stem_channels: int = 64) -> None:
        super().__init__()
        self.cardinality = cardinality
        self.bottleneck_width = bottleneck_width
        self.in_planes = stem_channels
        self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.layer1 = self._make_layer(num_blocks[0], 1)
        self.layer2 = self._make_layer(num_blocks[1], 2)
        self.layer3 = self._make_layer(num_blocks[2], 2)
        self.linear = nn.Linear(self.in_planes, num_classes)

    def _make_layer(self, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(Block(self.in_planes, self.cardinality, self.bottleneck_width, s))
            self.in_planes = Block.expansion * self.cardinality * self.bottleneck_width
        self.bottleneck_width *= 2  # double the group width after each stage
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.avg_pool2d(out, 8)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def build(num_classes: int = 10, width: float = 1.0, cardinality: int = 8,
          num_blocks: tuple[int, int, int] = (2, 2, 2)) -> nn.Module:
    """Build a CIFAR ResNeXt; ``width`` scales the per-group width (4 at 1.0) and the stem (32)."""
    bottleneck_width = max(1, int(round(4 * width)))
    stem = max(1, int(round(32 * width)))
    return ResNeXt(num_blocks, cardinality, bottleneck_width, num_classes=num_classes, stem_channels=stem)


def example_inputs(batch: int = 2) -> tuple[Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)
