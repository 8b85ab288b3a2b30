"""The call that builds a model's output object in a captured graph.

A graph names the output's class by its import path (``"module:QualName"``), a string, so the
graph prints, copies and saves like any other; :func:`build_output` finds the class when it
runs: in a module already imported, or, only for a module the ``structprune.io`` allow-list
admits, by importing it. Only dataclasses (Hugging Face's ``ModelOutput``) and named tuples
are built.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
from typing import Any

from .errors import ModelError


def output_path(cls: type) -> str:
    """The string :func:`build_output` takes for ``cls``."""
    return f"{cls.__module__}:{cls.__qualname__}"


@functools.lru_cache(maxsize=None)
def _resolve(path: str) -> type:
    modname, _, qual = path.partition(":")
    mod = sys.modules.get(modname)
    if mod is None:
        from .io import ALLOWED

        if not ALLOWED.allows(f"{modname}.{qual}"):
            raise ModelError(f"the graph returns a {qual} from module '{modname}', which is "
                             f"not imported and not on structprune.io's allow-list: import it "
                             f"first, or structprune.io.allow() it")
        mod = importlib.import_module(modname)
    obj: Any = mod
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and (dataclasses.is_dataclass(obj) or (
            issubclass(obj, tuple) and hasattr(obj, "_fields")))):
        raise ModelError(f"'{path}' is not a dataclass or a named tuple: the graph cannot "
                         f"return it")
    return obj


def build_output(path: str, *items: Any, **fields: Any) -> Any:
    """The model's output object: the class ``path`` names, built from ``items`` (a named
    tuple) or ``fields`` (a dataclass such as a Hugging Face ``ModelOutput``)."""
    return _resolve(path)(*items, **fields)
