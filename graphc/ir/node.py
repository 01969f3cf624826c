"""IR nodes and graphs: immutable nodes that know their type and source location at construction.

Nodes are created only through `graphc.ir.ops.apply`, which runs the op's dtype and shape rules,
so every node that exists is well typed. Equality is structural (op, inputs, attrs, type), which
is what common-subexpression elimination and caching want; names and locations are carried along
for people and error messages but do not take part in equality.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from graphc.errors import SourceLoc
from graphc.ir.types import TensorType

AttrValue = int | float | bool | str | tuple | None
Attrs = tuple[tuple[str, AttrValue], ...]   # sorted (key, value) pairs: hashable and ordered


def freeze_attrs(attrs: Mapping[str, AttrValue]) -> Attrs:
    def freeze(v):
        return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v
    return tuple(sorted((k, freeze(v)) for k, v in attrs.items()))


@dataclass(frozen=True, eq=False)
class Node:
    op: str
    inputs: tuple[Node, ...]
    attrs: Attrs
    type: TensorType
    loc: SourceLoc | None = None
    name: str | None = None             # the .nn name it was bound to, if any
    tags: frozenset[str] = frozenset()  # e.g. {"gradient"} for nodes of a derived backward graph
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_hash", hash((self.op, self.inputs, self.attrs, self.type)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if not isinstance(other, Node) or self._hash != other._hash:
            return False
        return (self.op == other.op and self.attrs == other.attrs and self.type == other.type
                and self.inputs == other.inputs)

    @property
    def attr(self) -> dict[str, AttrValue]:
        return dict(self.attrs)

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    def relabeled(self, **labels) -> Node:
        """The same computation under other labels: `name`, `loc`, `tags`, the fields that take
        no part in equality (a rewrite's result standing for the node it replaces, a value bound
        to a name). The node itself when they are its own already."""
        assert labels.keys() <= {"name", "loc", "tags"}, f"internal error: {set(labels)} are no labels"
        if all(getattr(self, key) == value for key, value in labels.items()):
            return self
        return replace(self, **labels)

    def label(self) -> str:
        """How messages refer to this node."""
        if self.name:
            return self.name
        if self.op == "const":
            return repr(self.attr["value"])
        return f"<{self.op}>"

    def __repr__(self) -> str:
        return f"Node({self.op}, {self.type}, name={self.name!r})"


def topo_order(roots: Iterable[Node]) -> list[Node]:
    """Every node reachable from `roots`, each after its inputs (deterministic order)."""
    order: list[Node] = []
    seen: set[int] = set()
    for root in roots:
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in seen:
                continue
            if expanded:
                seen.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            for inp in reversed(node.inputs):
                if id(inp) not in seen:
                    stack.append((inp, False))
    return order


@dataclass(frozen=True)
class Graph:
    """A program: named outputs over inputs and parameters. `loss`, when present, is an output too."""

    name: str
    outputs: tuple[tuple[str, Node], ...]
    mode: str = "eval"                  # "eval" (inference) or "train" (dropout and friends active)

    @property
    def output_map(self) -> dict[str, Node]:
        return dict(self.outputs)

    def nodes(self) -> list[Node]:
        return list(self._order)

    @functools.cached_property
    def _order(self) -> tuple[Node, ...]:
        # Graphs are immutable, so their order is computed once (passes ask for it often).
        return tuple(topo_order(node for _, node in self.outputs))

    def _sources(self, op: str) -> list[Node]:
        return [n for n in self.nodes() if n.op == op]

    @property
    def inputs(self) -> list[Node]:
        return self._sources("input")

    @property
    def params(self) -> list[Node]:
        return self._sources("param")

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes())
