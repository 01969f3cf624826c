"""What the layers (calls.py) and role inference (params.py) use of the model builder, as
protocols: builder.py imports both modules, so they name these instead of `ModelBuilder`."""
from __future__ import annotations

from typing import Any, Protocol

from graphc.errors import SourceLoc
from graphc.frontend import ast
from graphc.frontend.values import Tensor
from graphc.ir.node import Node
from graphc.ir.types import TensorType


class LayerBuilder(Protocol):
    """The builder as a layer (linear, conv, batchnorm, ...) sees it: it reads its tensor
    arguments, names and creates its parameters, and applies ops."""
    stats: dict[str, Node]
    random_streams: int         # dropout sites numbered so far (each draws its own stream)

    def tensor_arg(self, fn: str, value, expr: ast.Expr) -> Tensor: ...

    def layer_prefix(self, kind: str) -> str: ...

    def new_param(self, name: str, ttype: TensorType, init: tuple, role: str | None,
                  loc: SourceLoc) -> Tensor: ...

    def set_layer_role(self, name: str, role: str, loc: SourceLoc) -> None: ...

    def apply_op(self, op: str, operands: list, attrs: dict, expr: ast.Expr,
                 attr_locs: dict[str, SourceLoc] | None = None) -> Tensor: ...


class ModelState(Protocol):
    """What role inference reads of a model being built: its outputs, loss, names and parameters
    (each with a `role`, None until inferred)."""
    outputs: dict[str, Node]
    loss: Node | None
    env: dict[str, object]
    params: dict[str, Any]
