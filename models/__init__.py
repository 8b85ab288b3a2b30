"""Reference architectures, looked up by name.

Each module defines ``build(num_classes=10, ...) -> nn.Module`` and
``example_inputs(batch=...) -> tuple[Tensor, ...]``. Two kinds of model are registered:

- ``"image"``: CNNs and ViTs in plain PyTorch (``build(num_classes=10, width=1.0, ...)``, inputs
  ``[batch, 3, H, W]``). Large ImageNet models (224x224) are registered for benchmarks but left
  out of ``names()`` unless asked for.
  ``yolov8n`` is a detector: its output is ``[batch, 4 + num_classes, anchors]`` (``size="s"``
  builds YOLOv8-s).
- ``"graph"``: GNNs built from PyTorch Geometric layers (``build(num_features=16,
  num_classes=10, hidden=..., ...)``), listed only by ``names(kind="graph")`` or
  ``names(kind="all")``, since torch_geometric is an optional dependency (``structprune[gnn]``)
  and is imported only when one of them is built. Their ``example_inputs`` are a random undirected
  graph ``(x, edge_index)`` (``batch`` = number of disjoint random graphs, 12-30 nodes each), or
  ``(x, edge_index, batch_vector)`` for graph classification (``gin_graph``).

Example:
    >>> import models
    >>> model = models.get("resnet20")
    >>> model(*models.example_inputs("resnet20")).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.nn as nn
from torch import Tensor


@dataclass(frozen=True)
class _Entry:
    module: str
    defaults: dict[str, Any] = field(default_factory=dict)
    is_large: bool = False
    kind: str = "image"


KINDS = ("image", "graph", "all")

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
    "yolov8n": _Entry("yolov8", {"size": "n"}),
    "resnet50": _Entry("imagenet_resnet", {"depth": 50}, is_large=True),
    "resnet101": _Entry("imagenet_resnet", {"depth": 101}, is_large=True),
    "resnet152": _Entry("imagenet_resnet", {"depth": 152}, is_large=True),
    "densenet121": _Entry("densenet121", is_large=True),
    "gcn": _Entry("gnn", {"arch": "gcn"}, kind="graph"),
    "graphsage": _Entry("gnn", {"arch": "graphsage"}, kind="graph"),
    "gin": _Entry("gnn", {"arch": "gin"}, kind="graph"),
    "gat": _Entry("gnn", {"arch": "gat"}, kind="graph"),
    "gatv2": _Entry("gnn", {"arch": "gatv2"}, kind="graph"),
    "gin_graph": _Entry("gnn_graph", kind="graph"),
    "ugs_gcn": _Entry("gnn_ugs", kind="graph"),
}


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(_REGISTRY)}") from None


def _module(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{_entry(name).module}")


def names(include_large: bool = False, kind: Literal["image", "graph", "all"] = "image") -> list[str]:
    """List registered model names of ``kind`` (``"image"``, ``"graph"`` or ``"all"``);
    ImageNet-size ones only with ``include_large=True``."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    return [
        n
        for n, e in _REGISTRY.items()
        if (include_large or not e.is_large) and kind in ("all", e.kind)
    ]


def is_large(name: str) -> bool:
    return _entry(name).is_large


def require_pyg() -> None:
    """Raise a clear ImportError when PyTorch Geometric (the GNN models' dependency) is absent."""
    import importlib.util

    if importlib.util.find_spec("torch_geometric") is None:
        raise ImportError("the GNN models in models/ need PyTorch Geometric: pip install "
                          "'structprune[gnn]' (torch-geometric>=2.4)")


def is_graph(name: str) -> bool:
    """True for the GNNs (they need torch_geometric and take graph inputs)."""
    return _entry(name).kind == "graph"


def get(name: str, **cfg: Any) -> nn.Module:
    """Build model ``name`` with random weights; ``cfg`` overrides its ``build`` defaults."""
    return _module(name).build(**{**_entry(name).defaults, **cfg})


def example_inputs(name: str, batch: int | None = None, **cfg: Any) -> tuple[Tensor, ...]:
    """Random inputs for model ``name`` (float32 features); ``batch`` defaults to 2, or 1 for large
    models. For graph models ``batch`` is the number of random graphs (default 1, or 3 for
    ``gin_graph``) and ``cfg`` may set ``num_features`` (default 16, as ``get``) and
    ``num_nodes`` (nodes per graph; default random in [12, 30])."""
    module = _module(name)
    if batch is not None:
        cfg["batch"] = batch
    return module.example_inputs(**cfg)
