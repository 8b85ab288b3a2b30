"""Op rules, one module per family; importing this package fills the registry."""
from . import attention, conv, elementwise, linear, norm, pool, shape  # noqa: F401
from .registry import CoupleContext, OpRule, register, registry

__all__ = ["CoupleContext", "OpRule", "register", "registry"]
