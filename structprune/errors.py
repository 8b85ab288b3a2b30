"""Errors and warnings raised by structprune. Every error names the culprit and suggests a fix."""
from __future__ import annotations


class StructpruneError(Exception):
    """Base class of every error structprune raises on purpose."""


class TraceError(StructpruneError):
    """The model could not be captured as a graph, or did not run on the example inputs."""


class UnsupportedOpError(StructpruneError):
    """An op was asked to do something its rule cannot do safely."""


class PlanError(StructpruneError, ValueError):
    """A pruning request or plan is invalid (bad ratio, unknown module, a layer would be emptied)."""


class ModelError(StructpruneError, ValueError):
    """The model itself cannot be pruned as it is (meta device, half precision, ...)."""


class StructpruneWarning(UserWarning):
    """Something was done conservatively (frozen) that the user may want to know about."""


class NothingPrunedWarning(StructpruneWarning):
    """A prune removed nothing, or much less than was asked; the message names the largest frozen
    parts and why they are frozen. The CLI exits non-zero on it unless ``--allow-noop``."""
