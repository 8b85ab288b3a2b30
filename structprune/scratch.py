"""Memory that lives for one pass: scratch buffers, and the pass-scoped tables behind them.

Temporaries as large as a weight (its square while scoring, a half-sliced copy while slicing)
cost more in fresh pages than in arithmetic when they are allocated anew for every tensor.
Inside ``with scratch_space():`` :func:`temporary` hands out views of one growing buffer per
dtype and device; outside, it allocates normally. Never return such a view to a caller.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Optional, Sequence

import torch


class PassLocal(threading.local):
    """A dict that exists only inside ``with slot.scope():`` (per thread, nestable)."""

    table: Optional[dict] = None

    @contextlib.contextmanager
    def scope(self) -> Iterator[dict]:
        outer, self.table = self.table, {}
        try:
            yield self.table
        finally:
            self.table = outer


_SCRATCH = PassLocal()


def scratch_space() -> contextlib.AbstractContextManager:
    """Let the temporaries of one pass share one buffer per dtype and device."""
    return _SCRATCH.scope()


def temporary(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape``, from the pass's scratch space."""
    pool = _SCRATCH.table
    if pool is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    n = math.prod(shape)
    buf = pool.get((dtype, device))
    if buf is None or buf.numel() < n:
        buf = pool[(dtype, device)] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(tuple(shape))
