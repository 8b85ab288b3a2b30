"""Reference architectures in plain PyTorch, looked up by name.

Each module defines ``build(num_classes=10, width=1.0, ...) -> nn.Module`` and
``example_inputs(batch=2) -> tuple[Tensor, ...]``. Large ImageNet models (224x224) are registered
for benchmarks but left out of ``names()`` unless asked for.

Example:
    >>> import models
    >>> model = models.get("resnet20")
    >>> model(*models.example_inputs("resnet20")).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from torch import Tensor


@dataclass(frozen=True)
class _Entry:
    module: str
    defaults: dict[str, Any] = field(default_factory=dict)
    is_large: bool = False


_REGISTRY: dict[str, _Entry] = {
    "resnet20": _Entry("cifar_resnet", {"depth": 20}),
    "resnet56": _Entry("cifar_resnet", {"depth": 56}),
    "vgg16_bn": _Entry("vgg"),
    "mobilenetv2": _Entry("mobilenetv2"),
    "densenet": _Entry("densenet"),
    "shufflenetv2": _Entry("shufflenetv2"),
    "resnext": _Entry("resnext"),
    "senet": _Entry("senet"),
    "unet": _Entry("unet"),
    "vit": _Entry("vit", {"attention": "mha"}),
    "vit_sdpa": _Entry("vit", {"attention": "sdpa"}),
    "vit_manual": _Entry("vit", {"attention": "manual"}),
    "convnext": _Entry("convnext"),
    "resnet50": _Entry("imagenet_resnet", {"depth": 50}, is_large=True),
    "resnet101": _Entry("imagenet_resnet", {"depth": 101}, is_large=True),
    "resnet152": _Entry("imagenet_resnet", {"depth": 152}, is_large=True),
    "densenet121": _Entry("densenet121", is_large=True),
}


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(_REGISTRY)}") from None


def _module(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{_entry(name).module}")


def names(include_large: bool = False) -> list[str]:
    """List registered model names; ImageNet-size ones only with ``include_large=True``."""
    return [n for n, e in _REGISTRY.items() if include_large or not e.is_large]


def is_large(name: str) -> bool:
    return _entry(name).is_large


def get(name: str, **cfg: Any) -> nn.Module:
    """Build model ``name`` with random weights; ``cfg`` overrides its ``build`` defaults."""
    return _module(name).build(**{**_entry(name).defaults, **cfg})


def example_inputs(name: str, batch: int | None = None) -> tuple[Tensor, ...]:
    """Random inputs for model ``name`` (float32); ``batch`` defaults to 2, or 1 for large models."""
    module = _module(name)
    return module.example_inputs() if batch is None else module.example_inputs(batch=batch)
