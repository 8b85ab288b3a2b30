"""VGG-16 with batch norm for CIFAR, from "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (Simonyan and Zisserman, ICLR 2015), with the usual 512-512 CIFAR classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

CFG_16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out_channels = max(1, int(v * width))
                layers += [
                    nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = x.view(x.size(0), -1)  # [N, 512 * width] after five 2x2 pools of a 32x32 input
        return self.classifier(x)


def build(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return VGG(CFG_16, num_classes=num_classes, width=width)


def example_inputs(batch: int = 2) -> tuple[Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)
