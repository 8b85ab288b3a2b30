"""Gradient-based scorers: first-order Taylor (Molchanov et al., "Importance Estimation for
Neural Network Pruning", CVPR 2019) and the diagonal-Fisher OBD saliency (LeCun et al., "Optimal
Brain Damage", 1990; h_qq ~ E[g^2])."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import PlanError
from ..graph.group import Group
from .base import (Normalizer, Reduction, cached_per_index, normalize, reduce_members,
                   scored_members, tensor_of, to_units)


def _grad_scores(group: Group, graph: object, fn, what: str) -> list[torch.Tensor]:
    def per_index(t: torch.Tensor, dim: int) -> torch.Tensor:
        v = fn(t.detach().double(), t.grad.detach().double())
        return v.transpose(0, dim).reshape(t.shape[dim], -1).sum(1).cpu()

    scores = []
    for m in scored_members(group, None):
        if tensor_of(graph, m).grad is None:
            continue
        v = cached_per_index(graph, m, what, per_index)
        scores.append(to_units(group, m, v.abs()))
    if not scores and any(tensor_of(graph, m).requires_grad for m in group.params):
        names = sorted({m.qualname for m in group.params})[:3]
        raise PlanError(f"{what} importance needs gradients, but {', '.join(names)} have none: "
                        f"pass calibration batches and a loss (sp.prune(..., data=loader, "
                        f"loss_fn=F.cross_entropy)), or run loss.backward() on the model "
                        f"yourself before pruning")
    return scores


class TaylorImportance:
    """Score a unit by ``|sum w * dL/dw|`` over each member slice.

    Gradients come from ``sp.prune(..., data=..., loss_fn=...)`` (recomputed before every
    scoring, so iterative schedules work) or, without data, from the model's own ``.grad``.

    Args:
        reduction: how member scores combine. (default: ``"mean"``)
        normalizer: per-group rescaling. (default: ``"mean"``)
    """

    needs_grad = True

    def __init__(self, reduction: Reduction = "mean", normalizer: Normalizer = "mean") -> None:
        self.reduction, self.normalizer = reduction, normalizer

    def __call__(self, group: Group, graph: object) -> Optional[torch.Tensor]:
        s = reduce_members(_grad_scores(group, graph, lambda w, g: w * g, "taylor"), self.reduction)
        return None if s is None else normalize(s, self.normalizer)


class HessianImportance:
    """OBD with a diagonal-Fisher Hessian: ``1/2 sum (g w)^2`` over each member slice.

    ``.grad`` is read as one sample of the gradient: with ``data=`` it is the mean gradient
    over the calibration batches; for an expectation of squared gradients accumulate them
    yourself and put them in ``.grad``.
    """

    needs_grad = True

    def __init__(self, reduction: Reduction = "mean", normalizer: Normalizer = "mean") -> None:
        self.reduction, self.normalizer = reduction, normalizer

    def __call__(self, group: Group, graph: object) -> Optional[torch.Tensor]:
        fn = lambda w, g: 0.5 * (g * w) ** 2  # noqa: E731
        s = reduce_members(_grad_scores(group, graph, fn, "hessian"), self.reduction)
        return None if s is None else normalize(s, self.normalizer)
