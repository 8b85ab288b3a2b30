"""Allocators: which units go, given scores. ``uniform``, ``global_``, ``mac_target``."""
from .global_ import global_
from .mac_target import mac_target
from .uniform import keep_count, uniform

__all__ = ["uniform", "global_", "mac_target", "keep_count"]
