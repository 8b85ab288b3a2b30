"""Training-mode helpers shared by capture, apply, the pruner and the diagnostics."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run in eval mode (no running-stat updates, no dropout), then restore every module's flag."""
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True
