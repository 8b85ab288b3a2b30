"""MobileNetV2 for CIFAR, from "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
(Sandler et al., CVPR 2018).

The CIFAR variant keeps the first conv and the second stage at stride 1. ``depth`` scales the
number of repeats per stage (at least one each), so tests can run a shallow copy of the same
block structure.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

# t (expansion), c (channels), n (repeats), s (stride of the first repeat)
CIFAR_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # do not round down by more than 10%
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),  # depthwise
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),  # linear bottleneck
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, depth: float = 1.0,
                 last_channel: int = 1280, dropout: float = 0.2) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width)
        self.last_channel = _make_divisible(last_channel * max(1.0, width))
        features: list[nn.Module] = [ConvBNReLU(3, input_channel, stride=1)]
        for t, c, n, s in CIFAR_SETTING:
            output_channel = _make_divisible(c * width)
            for i in range(max(1, math.ceil(n * depth))):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(self.last_channel, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def build(num_classes: int = 10, width: float = 0.5, depth: float = 0.5,
          last_channel: int = 640) -> nn.Module:
    """Build a CIFAR MobileNetV2; ``width=1, depth=1, last_channel=1280`` is the paper's net."""
    return MobileNetV2(num_classes=num_classes, width=width, depth=depth, last_channel=last_channel)


def example_inputs(batch: int = 2) -> tuple[Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)
