"""The reference evaluator: a graph run node by node, each op by its numpy reference in the op
table, every value a fresh array. The oracle every backend (the fast numpy one included) is
tested against, and what constant folding computes with. Kept plain on purpose: nobody optimizes it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from graphc.ir.node import Graph, Node
from graphc.ir.ops import OPS
from graphc.ir.types import bind_shape

_LOADS = ("input", "param", "state")


def evaluate_node(node: Node, args: Sequence[np.ndarray], dims: Mapping[str, int] | None = None
                  ) -> np.ndarray:
    """`node`'s value for its operands' values `args`, by its op's numpy reference. Symbolic
    sizes in attributes are bound from `dims`; an op that writes into `out` gets a fresh array of
    the node's type, as the fast backends give it theirs."""
    op = OPS[node.op]
    assert op.numpy is not None, f"internal error: {node.op} has no numpy reference ({node})"
    dims = dims or {}
    attrs = {k: bind_shape(v, dims) if op.attrs[k].kind == "ints" else v for k, v in node.attrs}
    if op.numpy_out:
        attrs["out"] = np.empty(bind_shape(node.shape, dims), node.dtype.numpy)
    return np.asarray(op.numpy(*args, **attrs))


def evaluate(graph: Graph, feeds: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
             dims: Mapping[str, int] | None = None, state: Mapping[str, np.ndarray] | None = None
             ) -> dict[str, np.ndarray]:
    """Every output of `graph` (a primitive graph, as the passes leave it) for the given inputs,
    parameters and optimizer state, `dims` binding its symbolic sizes. Each value is checked
    against its node's type: a reference that disagrees with the op's rules is an internal error."""
    dims = dims or {}
    loads = dict(zip(_LOADS, (feeds, params, state or {})))
    values: dict[int, np.ndarray] = {}
    for node in graph.nodes():
        if node.op == "const":
            value = np.asarray(node.attr["value"], node.dtype.numpy)
        elif node.op in loads:
            value = np.asarray(loads[node.op][node.attr["name"]])
        else:
            value = evaluate_node(node, [values[id(i)] for i in node.inputs], dims)
            want = (bind_shape(node.shape, dims), node.dtype.numpy)
            assert (value.shape, value.dtype) == want, (
                f"internal error: the numpy reference of {node.op} gave {value.dtype}"
                f"{list(value.shape)} where {node} is {want[1]}{list(want[0])}")
        values[id(node)] = value
    return {name: np.array(values[id(node)]) for name, node in graph.outputs}


class ReferenceExecutor:
    """`evaluate` behind the executors' interface (`run(feeds, params, dims, state)`), so that a
    Program can run on the oracle (graphc check)."""

    name = "reference"

    def __init__(self, graph: Graph):
        self.graph = graph

    def run(self, feeds, params, dims, state=None) -> dict[str, np.ndarray]:
        return evaluate(self.graph, feeds, params, dims, state)
