"""The op table: every op declared once (arity, attributes, dtype and shape rules, numpy reference,
room for a gradient rule, and for composites a decomposition into primitives).

Shape inference, printers, verifiers, passes and the numpy backend all read this table; none keeps
an `if op == ...` chain of its own. Backends keep their lowering tables elsewhere, keyed by the same
names. Rules receive `Operand`s (a type and a label such as `x` or `x @ W1`) so that their messages
can name what the user wrote.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphc.errors import SourceLoc
from graphc.ir.node import Node, freeze_attrs
from graphc.ir.types import DType, TensorType, shape_problem


class TypeError_(Exception):
    """A dtype or shape rule was broken; the message names the op's operands. Callers add the location."""

    def __init__(self, message: str, hint: str | None = None, attr: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.attr = attr        # the attribute at fault, so the caret can point at it


@dataclass(frozen=True)
class Operand:
    type: TensorType
    label: str

    def __str__(self) -> str:
        return f"{self.label} is {self.type}"

    def described(self) -> str:
        """For the middle of a sentence: `x @ W (f32[N, 3])`."""
        return f"{self.label} ({self.type})"


@dataclass(frozen=True)
class Attr:
    kind: str                # int | float | bool | str | axis | axes | ints | dtype | any
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: int | tuple[int, int | None]            # exact, or (min, max or None for variadic)
    dtype_rule: Callable[[Sequence[Operand], dict], DType]
    shape_rule: Callable[[Sequence[Operand], dict], tuple]
    numpy: Callable[..., Any] | None                # reference: numpy(*arrays, **attrs) -> array
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    kind: str = "elementwise"   # source | elementwise | reduction | matmul | layout | composite | random
    decompose: Callable[..., Node] | None = None    # composites: (builder, inputs, attrs, loc) -> Node
    grad: Callable[..., Any] | None = None          # filled in by the autodiff module
    numpy_out: bool = False     # numpy(*arrays, out=buf, **attrs) writes into a preallocated buffer
    # The numpy ufunc `numpy` wraps, where it is one called as is (elementwise ops, matmul) or
    # through its reduce (reductions): the fast numpy backend calls it directly.
    ufunc: Any = None
    doc: str = ""

    @property
    def is_composite(self) -> bool:
        return self.decompose is not None

    def check_arity(self, n: int) -> str | None:
        lo, hi = (self.arity, self.arity) if isinstance(self.arity, int) else self.arity
        if n < lo or (hi is not None and n > hi):
            if lo == hi:
                want = f"{lo} operand{'s' if lo != 1 else ''}"
            elif hi is None:
                want = f"at least {lo} operand{'s' if lo != 1 else ''}"
            else:
                want = f"{lo} to {hi} operands"
            return f"{self.name} takes {want}, got {n}"
        return None


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    assert op.name not in OPS, f"internal error: op {op.name} declared twice"
    OPS[op.name] = op
    return op


def get(name: str) -> OpDef:
    return OPS[name]


def resolve_attrs(op: OpDef, attrs: Mapping[str, Any]) -> dict:
    unknown = set(attrs) - set(op.attrs)
    assert not unknown, f"internal error: {op.name} got unknown attributes {sorted(unknown)}"
    out = {}
    for key, spec in op.attrs.items():
        if key in attrs:
            out[key] = attrs[key]
        else:
            assert not spec.required, f"internal error: {op.name} needs attribute {key}"
            out[key] = spec.default
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def attr_fits(spec: Attr, value) -> bool:
    """Does `value` have the kind the op table declares? (Used where attributes come from files.)"""
    from graphc.ir.types import DTYPE_NAMES
    if value is None:
        return not spec.required and spec.default is None
    kind = spec.kind
    if kind in ("int", "axis"):
        return _is_int(value)
    if kind == "float":
        return _is_int(value) or isinstance(value, float)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dtype":
        return value in DTYPE_NAMES
    if kind == "axes":
        return _is_int(value) or (isinstance(value, tuple) and all(_is_int(v) for v in value))
    if kind == "ints":
        return isinstance(value, tuple) and all(_is_int(v) or isinstance(v, str) for v in value)
    if kind == "any":   # a constant's value
        return _is_int(value) or isinstance(value, (float, bool))
    raise AssertionError(f"internal error: attribute kind {kind}")


def infer_type(op: OpDef, operands: Sequence[Operand], attrs: dict) -> TensorType:
    problem = op.check_arity(len(operands))
    if problem:
        raise TypeError_(problem)
    dtype = op.dtype_rule(operands, attrs)
    shape = tuple(op.shape_rule(operands, attrs))
    problem = shape_problem(shape)
    if problem:
        raise TypeError_(f"{op.name}: the result {TensorType(dtype, shape)} is too large: "
                         f"{problem}")
    return TensorType(dtype, shape)


def apply(op_name: str, inputs: Sequence[Node], attrs: Mapping[str, Any] | None = None, *,
          loc: SourceLoc | None = None, name: str | None = None, labels: Sequence[str] | None = None,
          tags: frozenset[str] = frozenset()) -> Node:
    """Build a node, running the op's rules. Raises `TypeError_` when they are broken."""
    op = OPS[op_name]
    attrs = resolve_attrs(op, attrs or {})
    labels = labels or [n.label() for n in inputs]
    operands = [Operand(n.type, lab) for n, lab in zip(inputs, labels)]
    node_type = infer_type(op, operands, attrs)
    return Node(op_name, tuple(inputs), freeze_attrs(attrs), node_type, loc, name, tags)


def source(op_name: str, type: TensorType, *, loc: SourceLoc | None = None, name: str | None = None,
           **attrs) -> Node:
    """A node with no inputs (input, param, const) of a given type."""
    assert OPS[op_name].kind == "source", f"internal error: {op_name} is not a source op"
    if "name" in OPS[op_name].attrs:
        attrs.setdefault("name", name)   # inputs and params are identified by name
    return Node(op_name, (), freeze_attrs(resolve_attrs(OPS[op_name], attrs)), type, loc, name)


def rebuilt(node: Node, inputs: Sequence[Node]) -> Node:
    """`node` over new inputs (used by passes); rules rerun, so types are checked, not trusted."""
    # Identity, not equality: comparing equal but distinct inputs walks their whole subgraphs.
    if len(inputs) == len(node.inputs) and all(a is b for a, b in zip(inputs, node.inputs)):
        return node
    new = apply(node.op, inputs, node.attr, loc=node.loc, name=node.name, tags=node.tags)
    assert new.type == node.type, f"internal error: rebuilding {node} changed its type to {new.type}"
    return new
