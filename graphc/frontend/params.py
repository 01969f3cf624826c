"""Layer parameters: the scopes that name them after where they are used, the count of
parameter-creating call sites that decides those names, and the inference of parameter roles."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graphc.frontend import ast
from graphc.frontend.calls import is_layer_call
from graphc.frontend.values import Tensor
from graphc.ir.node import Node, topo_order

if TYPE_CHECKING:
    from graphc.frontend.builder import ModelBuilder


@dataclass
class Scope:
    """Where layer parameters created now get their names."""
    path: tuple[str, ...]
    collapse: bool               # exactly one parameter-creating call here: it takes the path itself
    counts: dict[str, int] = field(default_factory=dict)
    used_collapse: bool = False


def count_param_sites(expr: ast.Expr, defs: dict[str, ast.Def],
                      is_tensor: Callable[[str], bool]) -> int:
    """How many calls in `expr` create parameters (a layer, or a function that uses layers)."""
    count = 0
    for call in _calls(expr):
        if is_layer_call(call, is_tensor) or call.func in defs and def_creates_params(call.func, defs):
            count += 1
    return count


def def_creates_params(name: str, defs: dict[str, ast.Def]) -> bool:
    """Does calling `name` create parameters, directly or through the functions it calls?
    (A worklist, not recursion: chains of functions may be long.)"""
    pending, seen = [name], {name}
    while pending:
        for call in _calls(defs[pending.pop()].body):
            if is_layer_call(call, lambda n: False):
                return True
            if call.func in defs and call.func not in seen:
                seen.add(call.func)
                pending.append(call.func)
    return False


def _calls(expr: ast.Expr) -> Iterator[ast.Call]:
    """Every call in `expr`, outermost first, left to right."""
    pending = [expr]
    while pending:
        e = pending.pop()
        if isinstance(e, ast.Call):
            yield e
            children = [*e.args, *(k.value for k in e.kwargs)]
        elif isinstance(e, ast.BinOp):
            children = [e.left, e.right]
        elif isinstance(e, ast.Neg):
            children = [e.operand]
        elif isinstance(e, ast.ListExpr):
            children = list(e.items)
        else:
            continue
        pending.extend(reversed(children))


_SEE_THROUGH = {"transpose", "reshape", "cast"}


def _param_under(node: Node) -> Node | None:
    while node.op in _SEE_THROUGH:
        node = node.inputs[0]
    return node if node.op == "param" else None


def infer_roles(b: ModelBuilder, final: bool = True) -> dict[str, str]:
    """Roles of explicit parameters from their uses: multiplied in by a matrix product, a weight;
    added to a layer's output, a bias; anything else, other. Stated roles win."""
    roots = list(b.outputs.values()) + ([b.loss] if b.loss is not None else [])
    roots += [v.node for v in b.env.values() if isinstance(v, Tensor)]
    found: dict[str, str] = {}
    for node in topo_order(roots):
        if node.op in ("matmul", "linear", "conv2d"):
            for inp in node.inputs[:2]:
                p = _param_under(inp)
                if p is not None:
                    found[p.attr["name"]] = "weight"
        if node.op in ("add", "sub") or (node.op in ("linear", "conv2d") and len(node.inputs) == 3):
            for inp in (node.inputs if node.op in ("add", "sub") else node.inputs[2:]):
                p = _param_under(inp)
                if p is not None:
                    found.setdefault(p.attr["name"], "bias")
    roles = {}
    for name, spec in b.params.items():
        role = spec.role if spec.role is not None else found.get(name, "other")
        roles[name] = role
        if final and spec.role is None:
            spec.role = role
    return roles
