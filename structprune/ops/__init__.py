"""Op rules, one module per family; importing this package fills the registry."""
from . import attention, conv, elementwise, linear, norm, pool, shape  # noqa: F401
from . import aten  # noqa: F401  (after the others: it adds keys to their rules)
from . import output, recurrent, scatter  # noqa: F401
from . import embedding_bag, transformer  # noqa: F401
from ..rules import CoupleContext, OpRule, register, registry

__all__ = ["CoupleContext", "OpRule", "register", "registry"]
