"""Small U-Net, from "U-Net: Convolutional Networks for Biomedical Image Segmentation"
(Ronneberger et al., MICCAI 2015), with BN and same-padding convs as most reimplementations.

Output is a per-pixel logit map ``[N, num_classes, H, W]``; H and W must be divisible by
``2 ** (len(features) - 1)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class DoubleConv(nn.Module):
    """(conv => BN => ReLU) * 2"""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x1 = self.up(x1)
        x = torch.cat([x2, x1], dim=1)  # skip connection first, as in the paper's figure
        return self.conv(x)


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 2,
                 features: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.inc = DoubleConv(in_channels, features[0])
        self.downs = nn.ModuleList(Down(a, b) for a, b in zip(features[:-1], features[1:]))
        self.ups = nn.ModuleList(Up(b, a) for a, b in zip(reversed(features[:-1]), reversed(features[1:])))
        self.outc = nn.Conv2d(features[0], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inc(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.outc(x)


def build(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> nn.Module:
    """Build a 4-level U-Net; ``width`` scales the 16/32/64/128 feature widths."""
    features = tuple(max(2, 2 * int(round(c * width / 2))) for c in (16, 32, 64, 128))
    return UNet(in_channels=in_channels, num_classes=num_classes, features=features)


def example_inputs(batch: int = 2) -> tuple[Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)
