"""What .nn expressions evaluate to while a model is built: tensors (IR nodes with the label
messages use for them), plain numbers, strings, lists, dtypes and named parameter sets."""
from __future__ import annotations

from dataclasses import dataclass

from graphc.errors import SourceLoc
from graphc.ir.node import Node
from graphc.ir.types import DType


@dataclass(frozen=True)
class Tensor:
    node: Node
    label: str           # the .nn text that produced it (`x`, `x @ W1`)


@dataclass(frozen=True)
class Scalar:
    value: int | float | bool | str
    loc: SourceLoc


@dataclass(frozen=True)
class ListValue:
    items: tuple
    loc: SourceLoc


@dataclass(frozen=True)
class DTypeValue:
    dtype: DType


@dataclass(frozen=True)
class ParamSet:
    """`weights` or `biases`: every parameter of the model with that role."""
    role: str
    params: tuple[Tensor, ...]


class Poisoned(Exception):
    """An operand already failed with a reported error: skip quietly, report nothing more."""


POISON = object()    # bound to names whose statement failed


def describe(value) -> str:
    """A value in a message: 'the number 3', 'the list [...]'."""
    if isinstance(value, Tensor):
        return f"{value.label} ({value.node.type})"
    if isinstance(value, Scalar):
        kind = {bool: "the boolean", str: "the string"}.get(type(value.value), "the number")
        return f"{kind} {value.value!r}" if isinstance(value.value, str) else f"{kind} {value.value}"
    if isinstance(value, ListValue):
        return "a list"
    if isinstance(value, DTypeValue):
        return f"the dtype {value.dtype}"
    if isinstance(value, ParamSet):
        return f"the parameter set '{value.role}s'"
    return str(value)
