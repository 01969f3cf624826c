"""Structural rewrites: decomposing composites into primitives, and common-subexpression elimination."""
from __future__ import annotations

from collections.abc import Callable

from graphc.ir import ops as op_table
from graphc.ir.composites import decompose_node
from graphc.ir.node import Graph, Node


def rewrite(graph: Graph, visit: Callable[[Node, list[Node]], Node]) -> Graph:
    """Rebuild `graph` bottom-up; `visit(node, new_inputs)` returns each node's replacement."""
    new: dict[int, Node] = {}
    for node in graph.nodes():
        new[id(node)] = visit(node, [new[id(i)] for i in node.inputs])
    return Graph(graph.name, tuple((name, new[id(n)]) for name, n in graph.outputs), graph.mode)


def decompose(graph: Graph) -> Graph:
    def visit(node: Node, inputs: list[Node]) -> Node:
        if op_table.OPS[node.op].is_composite:
            return decompose_node(node, inputs)
        return op_table.rebuilt(node, inputs)
    return rewrite(graph, visit)


def cse(graph: Graph) -> Graph:
    canonical: dict[Node, Node] = {}

    def visit(node: Node, inputs: list[Node]) -> Node:
        candidate = op_table.rebuilt(node, inputs)
        return canonical.setdefault(candidate, candidate)
    return rewrite(graph, visit)


def train_mode(graph: Graph, ops: frozenset[str] | None = None) -> Graph:
    """The training form of a graph: every op with a `train` attribute (dropout, batch_norm)
    switched on, or only those named in `ops` (Monte Carlo dropout keeps batch norm off)."""
    def visit(node: Node, inputs: list[Node]) -> Node:
        if "train" in op_table.OPS[node.op].attrs and not node.attr["train"] \
                and (ops is None or node.op in ops):
            return op_table.apply(node.op, inputs, {**node.attr, "train": True}, loc=node.loc,
                                  name=node.name, tags=node.tags)
        return op_table.rebuilt(node, inputs)
    return Graph(graph.name, rewrite(graph, visit).outputs, "train")
