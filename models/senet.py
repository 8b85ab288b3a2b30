"""SE-ResNet for CIFAR, from "Squeeze-and-Excitation Networks" (Hu et al., CVPR 2018).

CIFAR ResNet BasicBlocks at 16/32/64 channels whose residual branch is rescaled per channel by a
squeeze-excitation gate before the add.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class SELayer(nn.Module):
    def __init__(self, channel: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channel, max(1, channel // reduction), bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(max(1, channel // reduction), channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c, _, _ = x.size()
        y = F.adaptive_avg_pool2d(x, 1).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y


class SEBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, reduction: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SELayer(planes, reduction)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.se(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        out = out + residual
        return self.relu(out)


class CifarSEResNet(nn.Module):
    def __init__(self, n_size: int, num_classes: int = 10, width: float = 1.0, reduction: int = 4) -> None:
        super().__init__()
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.inplane = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplane, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplane)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], n_size, 1, reduction)
        self.layer2 = self._make_layer(widths[1], n_size, 2, reduction)
        self.layer3 = self._make_layer(widths[2], n_size, 2, reduction)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int, reduction: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(SEBasicBlock(self.inplane, planes, s, reduction))
            self.inplane = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


def build(num_classes: int = 10, width: float = 1.0, depth: int = 20, reduction: int = 4) -> nn.Module:
    """Build a CIFAR SE-ResNet of ``depth = 6n + 2`` layers (SE-ResNet-20 is ``depth=20``)."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n + 2, got {depth}")
    return CifarSEResNet((depth - 2) // 6, num_classes=num_classes, width=width, reduction=reduction)


def example_inputs(batch: int = 2) -> tuple[Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)
