"""Scratch memory for one pass: reuse a temporary buffer instead of allocating per tensor.

Temporaries as large as a weight (its square while scoring, a half-sliced copy while slicing)
cost more in fresh pages than in arithmetic when they are allocated anew for every tensor.
Inside ``with scratch_space():`` :func:`temporary` hands out views of one growing buffer per
dtype and device; outside, it allocates normally. Never return such a view to a caller.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Sequence

import torch

_SCRATCH = threading.local()


@contextlib.contextmanager
def scratch_space() -> Iterator[None]:
    """Let the temporaries of one pass share one buffer per dtype and device."""
    outer = getattr(_SCRATCH, "pool", None)
    _SCRATCH.pool = {}
    try:
        yield
    finally:
        _SCRATCH.pool = outer


def temporary(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape``, from the pass's scratch space."""
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    n = math.prod(shape)
    buf = pool.get((dtype, device))
    if buf is None or buf.numel() < n:
        buf = pool[(dtype, device)] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(tuple(shape))
