"""Rewrites for graphs that are differentiated already: their stop_gradient nodes did their work
(they cut the backward walk) and are now identities."""
from __future__ import annotations

from graphc.ir import ops as op_table
from graphc.ir.node import Graph, Node
from graphc.passes.rewrite import rewrite
from graphc.passes.simplify import differentiated


def drop_stop_gradient(graph: Graph) -> Graph:
    """stop_gradient(x) -> x, in graphs that hold their gradients (loss_and_grads, train_step).
    A graph that may still be differentiated (the training graph before autodiff, or any graph
    without gradient nodes) keeps them: dropping one there would change its gradient."""
    if not differentiated(graph):
        return graph

    def visit(node: Node, inputs: list[Node]) -> Node:
        return inputs[0] if node.op == "stop_gradient" else op_table.rebuilt(node, inputs)
    return rewrite(graph, visit)
