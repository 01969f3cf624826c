"""Rewrites for graphs that hold their gradients (the pipeline's after-autodiff stage): their
stop_gradient nodes did their work (they cut the backward walk) and are now identities."""
from __future__ import annotations

from graphc.ir import ops as op_table
from graphc.ir.node import Graph, Node
from graphc.passes.rewrite import rewrite


def drop_stop_gradient(graph: Graph) -> Graph:
    """stop_gradient(x) -> x. The pipeline runs it only on graphs after differentiation
    (loss_and_grads, train_step): in a graph autodiff may still differentiate (the training graph
    before autodiff) dropping one would change its gradient."""
    def visit(node: Node, inputs: list[Node]) -> Node:
        return inputs[0] if node.op == "stop_gradient" else op_table.rebuilt(node, inputs)
    return rewrite(graph, visit)
