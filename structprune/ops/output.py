"""Building the model's output object: a Hugging Face ``ModelOutput``, a dataclass or a named
tuple, which a ``torch.export`` capture rebuilds in the graph (``graph/export_capture.py``)."""
from __future__ import annotations

from typing import Iterator

import torch.fx as fx

from ..model_output import build_output
from ..rules import CoupleContext, Freeze, OpRule, Record, register


@register(build_output)
class BuildOutputRule(OpRule):
    """The fields are the model's outputs: they keep their shapes (as the output node's do)."""

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        node = ctx.node
        for a in list(node.args[1:]) + list(node.kwargs.values()):
            if isinstance(a, fx.Node):
                sa = ctx.shape(a)
                for d in range(len(sa or ())):
                    yield Freeze(ctx.space(a, d), "a model output keeps its shape")
