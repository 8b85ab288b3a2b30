"""CIFAR ResNet-20/56 from "Deep Residual Learning for Image Recognition" (He et al., CVPR 2016).

Three stages of BasicBlocks at 16/32/64 channels, 6n + 2 layers. Shortcuts are identities where
the shape is kept and 1x1 conv + BN projections (option B) where it changes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: int, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], num_blocks, stride=1)
        self.layer2 = self._make_layer(widths[1], num_blocks, stride=2)
        self.layer3 = self._make_layer(widths[2], num_blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def build(depth: int = 20, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """Build a CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110)."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n + 2, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, width=width)


def resnet20(**cfg) -> nn.Module:
    return build(depth=20, **cfg)


def resnet56(**cfg) -> nn.Module:
    return build(depth=56, **cfg)


def example_inputs(batch: int = 2) -> tuple[Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)
