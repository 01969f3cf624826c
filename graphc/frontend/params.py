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
    from graphc.frontend.protocols import ModelState


@dataclass
class Scope:
    """Where layer parameters created now get their names."""
    path: tuple[str, ...]
    collapse: bool               # exactly one parameter-creating call here: it takes the path itself
    counts: dict[str, int] = field(default_factory=dict)
    used_collapse: bool = False


def count_param_sites(expr: ast.Expr, param_functions: frozenset[str],
                      is_tensor: Callable[[str], bool]) -> int:
    """How many calls in `expr` create parameters (a layer, or a function that uses layers)."""
    return sum(1 for call in _calls(expr)
               if is_layer_call(call, is_tensor) or call.func in param_functions)


def param_functions(defs: dict[str, ast.Def]) -> frozenset[str]:
    """The user functions whose calls create parameters: those that call a layer, and those
    that call one of them. Found once per model, from the callers of each function outwards
    (chains of functions may be long: no recursion, no walk per call)."""
    callers: dict[str, set[str]] = {name: set() for name in defs}
    found = set()
    for name, d in defs.items():
        for call in _calls(d.body):
            if is_layer_call(call, lambda n: False):
                found.add(name)
            elif call.func in defs:
                callers[call.func].add(name)
    pending = list(found)
    while pending:
        for caller in callers[pending.pop()] - found:
            found.add(caller)
            pending.append(caller)
    return frozenset(found)


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


def infer_roles(b: ModelState, final: bool = True) -> dict[str, str]:
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
