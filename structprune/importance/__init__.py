"""Importance scorers and the one resolver that turns a name into a scorer."""
from __future__ import annotations

from typing import Any, Callable

from ..errors import PlanError
from .base import Importance
from .fpgm import FPGMImportance
from .magnitude import BNScaleImportance, LAMPImportance, MagnitudeImportance, RandomImportance
from .taylor import HessianImportance, TaylorImportance

_NAMES: dict[str, Callable[[], Any]] = {
    "random": RandomImportance,
    "l1": lambda: MagnitudeImportance(p=1),
    "l2": lambda: MagnitudeImportance(p=2),
    "bn_scale": BNScaleImportance,
    "taylor": TaylorImportance,
    "hessian": HessianImportance,
    "fpgm": FPGMImportance,
    "lamp": LAMPImportance,
}


def names() -> list[str]:
    """The importance names :func:`resolve` accepts."""
    return list(_NAMES)


def resolve(importance: Any) -> Importance:
    """An importance from a name (``"l2"``) or any callable ``(group, graph) -> scores``."""
    if isinstance(importance, str):
        key = importance.lower()
        if key not in _NAMES:
            raise PlanError(f"unknown importance {importance!r}; choose one of "
                            f"{', '.join(_NAMES)} or pass an Importance instance")
        return _NAMES[key]()
    if callable(importance):
        return importance
    raise PlanError(f"importance must be a name ({', '.join(_NAMES)}) or a callable, "
                    f"got {type(importance).__name__}")


__all__ = ["Importance", "MagnitudeImportance", "LAMPImportance", "BNScaleImportance",
           "RandomImportance", "TaylorImportance", "HessianImportance", "FPGMImportance",
           "resolve", "names"]
