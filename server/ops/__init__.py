"""The op registry: every op's forward computation, its vector-Jacobian products and its shape
rule side by side, one module per family. Importing this package registers them all in `OPS`;
`registry` explains what an op declares."""

from chainrule.server.ops import conv, dropout, elementwise, linalg, logic, losses, norm, pool, reductions, structure
from chainrule.server.ops.registry import (
    ANS,
    INFERENCE,
    OPS,
    SOURCE_OPS,
    STORED_SOURCES,
    Attr,
    Mode,
    NodeContext,
    Op,
    defop,
    unbroadcast,
)

FAMILIES = (elementwise, logic, linalg, reductions, structure, norm, dropout, losses, conv, pool)

__all__ = [
    "ANS",
    "FAMILIES",
    "INFERENCE",
    "OPS",
    "SOURCE_OPS",
    "STORED_SOURCES",
    "Attr",
    "Mode",
    "NodeContext",
    "Op",
    "defop",
    "unbroadcast",
]
