"""Constant folding: a node whose inputs are all constants and whose result is a scalar becomes a
`const`, computed by the reference evaluator (the op's numpy reference, in the node's dtype), so the
folded value is bit for bit what the unfolded graph computes. Tensors are never folded (a constant
is a scalar). This is the compiler's one constant folder: `simplify` folds through `folded` too."""
from __future__ import annotations

import numpy as np

from graphc.ir import ops as op_table
from graphc.ir.node import Graph, Node
from graphc.ir.reference import evaluate_node
from graphc.passes.rewrite import rewrite


def make_const(value, like: Node) -> Node:
    """A scalar constant of `like`'s type (and name, location, tags)."""
    assert like.shape == (), f"internal error: a constant is a scalar, not {like.type}"
    return op_table.source("const", like.type, value=value).relabeled(
        name=like.name, loc=like.loc, tags=like.tags)


def splat_value(node: Node):
    """The value of every element, when `node` is a constant seen through reshapes and broadcasts
    (a gradient seed such as broadcast_to(reshape(1.0, [1, 1]), [784, 256])); else None."""
    while node.op in ("reshape", "broadcast_to"):
        node = node.inputs[0]
    return node.attr["value"] if node.op == "const" else None


def folded(node: Node) -> Node | None:
    """`node` as a constant, or None when it is not a scalar over constants."""
    op = op_table.OPS[node.op]
    if (not node.inputs or node.shape != () or op.kind in ("source", "random", "collective", "composite")
            or any(i.op != "const" for i in node.inputs)):
        return None
    try:
        args = [np.asarray(i.attr["value"], dtype=i.dtype.numpy) for i in node.inputs]
        want = node.dtype.numpy
    except NotImplementedError:     # bf16: no numpy dtype, nothing to compute it with
        return None
    try:
        with np.errstate(all="ignore"):
            value = evaluate_node(node, args)
    except (ValueError, ArithmeticError, TypeError):
        return None
    # A value of another dtype than the node's (a reference that ignores `out`), or one JSON
    # cannot hold (inf, nan), stays a computation.
    if value.dtype != want or value.shape != () or (value.dtype.kind == "f"
                                                   and not np.isfinite(value)):
        return None
    return make_const(value.item(), node)


def fold_constants(graph: Graph) -> Graph:
    def visit(node: Node, inputs: list[Node]) -> Node:
        node = op_table.rebuilt(node, inputs)
        return folded(node) or node
    return rewrite(graph, visit)

