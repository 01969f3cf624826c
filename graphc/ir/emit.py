"""`Emit`: builds primitive nodes that share one source location and tag set (a decomposition's,
a gradient's, an optimizer update's)."""
from __future__ import annotations

from graphc.errors import SourceLoc
from graphc.ir import ops as op_table
from graphc.ir.node import Node
from graphc.ir.types import DType, TensorType


class Emit:
    """Builds nodes through the op table, all carrying one location and one set of tags."""

    def __init__(self, loc: SourceLoc | None, tags: frozenset[str] = frozenset()):
        self.loc, self.tags = loc, tags

    def __call__(self, op: str, *inputs: Node, **attrs) -> Node:
        return op_table.apply(op, inputs, attrs, loc=self.loc, tags=self.tags)

    def const(self, value, dtype: DType) -> Node:
        return op_table.source("const", TensorType(dtype, ()), loc=self.loc, value=value)

