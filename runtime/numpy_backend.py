"""The numpy backend: the reference every other backend is compared with.

It runs a primitive graph node by node with each op's numpy reference from the op table. Plans are
made once per batch shape: concrete shapes and one preallocated buffer per node whose reference can
write into one, reused by every later call with that shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphc.errors import Diagnostic, GraphcError
from graphc.ir import OPS
from graphc.ir.node import Graph, Node
from graphc.ir.types import bind_shape


@dataclass
class _Plan:
    buffers: list[np.ndarray | None]
    attrs: list[dict]           # attributes with symbolic sizes bound for this batch shape


class NumpyExecutor:
    name = "numpy"

    def __init__(self, graph: Graph):
        for node in graph.nodes():
            op = OPS[node.op]
            assert op.kind == "source" or not op.is_composite, (
                f"internal error: the numpy backend runs primitive graphs; {node.op} is composite")
        self.graph = graph
        self.order = graph.nodes()
        self.index = {id(n): i for i, n in enumerate(self.order)}
        self.steps = [(OPS[n.op], n.attr, [self.index[id(i)] for i in n.inputs]) for n in self.order]
        self.consts = {i: np.asarray(n.attr["value"], dtype=n.dtype.numpy)
                       for i, n in enumerate(self.order) if n.op == "const"}
        self.outputs = [(name, self.index[id(n)]) for name, n in graph.outputs]
        self.plans: dict[tuple, _Plan] = {}

    def plan(self, dims: dict[str, int]) -> _Plan:
        key = tuple(sorted(dims.items()))
        plan = self.plans.get(key)
        if plan is None:
            buffers = []
            for node, (op, _, _) in zip(self.order, self.steps):
                if op.numpy_out:
                    buffers.append(np.empty(bind_shape(node.shape, dims), dtype=node.dtype.numpy))
                else:
                    buffers.append(None)
            attrs = [{k: bind_shape(v, dims) if op.attrs[k].kind == "ints" else v
                      for k, v in a.items()} for op, a, _ in self.steps]
            plan = self.plans[key] = _Plan(buffers, attrs)
        return plan

    def run(self, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray],
            dims: dict[str, int], state: dict[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        plan = self.plan(dims)
        values: list = [None] * len(self.order)
        for i, (node, (op, _, ins)) in enumerate(zip(self.order, self.steps)):
            attrs = plan.attrs[i]
            if node.op == "input":
                values[i] = feeds[attrs["name"]]
            elif node.op == "param":
                values[i] = params[attrs["name"]]
            elif node.op == "state":
                values[i] = state[attrs["name"]]
            elif node.op == "const":
                values[i] = self.consts[i]
            else:
                args = [values[j] for j in ins]
                try:
                    if plan.buffers[i] is not None:
                        values[i] = op.numpy(*args, out=plan.buffers[i], **attrs)
                    else:
                        values[i] = op.numpy(*args, **attrs)
                except ValueError as err:
                    raise _runtime_error(node, err) from None
        # Buffers are reused by the next call: hand out copies.
        return {name: np.array(values[i], copy=True) for name, i in self.outputs}


def _runtime_error(node: Node, err: Exception) -> GraphcError:
    what = f" (computing {node.name})" if node.name else ""
    return GraphcError(Diagnostic(f"{node.op}{what}: {err}", node.loc))


BACKENDS = {"numpy": NumpyExecutor}
