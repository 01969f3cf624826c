"""Reverse-mode differentiation, graph to graph: from a scalar loss, a gradient node for each
requested source (parameters, and inputs on request), built from the op table's gradient rules.

The walk, not the rules, handles broadcasting (each contribution is summed back to its input's
shape), accumulation over several uses, arity, stop_gradient and integer values (no gradient).
Backward nodes carry the location of the forward node they come from, tagged "gradient".
"""
from __future__ import annotations

from collections.abc import Sequence

from graphc.ir import ops as op_table
from graphc.ir.contract import grad_output
from graphc.ir.emit import Emit
from graphc.ir.node import Graph, Node, topo_order
from graphc.ir.ops import OPS

GRADIENT = frozenset({"gradient"})


def sum_to(e: Emit, g: Node, shape: tuple) -> Node:
    """Sum `g` over the axes that broadcasting added or stretched, down to `shape`."""
    if g.shape == tuple(shape):
        return g
    lead = g.type.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape)
                                      if d == 1 and g.shape[lead + i] != 1)
    if axes:
        g = e("sum", g, axis=axes, keepdims=True)
    return e("reshape", g, shape=tuple(shape)) if g.shape != tuple(shape) else g


def derive_backward(loss: Node, wrt: Sequence[Node]) -> dict[Node, Node]:
    """d loss / d w for each w in `wrt` (a zero of w's type where the loss does not depend on w)."""
    assert loss.type.shape == () and loss.dtype.is_float, \
        f"internal error: differentiating the non-scalar {loss}"
    order = topo_order([loss])
    targets = {id(w) for w in wrt}
    active: set[int] = set()          # nodes whose value depends on a target
    for node in order:
        # stop_gradient cuts the flow; size reads only its operand's shape
        depends = id(node) in targets or (node.op not in ("stop_gradient", "size")
                                          and any(id(i) in active for i in node.inputs))
        if depends and node.dtype.is_float:   # integers carry no gradient
            active.add(id(node))
    pending: dict[int, list[Node]] = {id(loss): [op_table.source(
        "const", loss.type, loc=loss.loc, value=1.0)]}
    total: dict[int, Node] = {}
    for node in reversed(order):
        parts = pending.pop(id(node), None)
        if not parts or id(node) not in active:
            continue
        e = Emit(node.loc, GRADIENT)
        g = parts[0]
        for p in parts[1:]:
            g = e("add", g, p)
        total[id(node)] = g
        op = OPS[node.op]
        if op.kind == "source":
            continue
        assert op.grad is not None, f"internal error: no gradient rule for {node.op} ({node})"
        wants = [id(i) in active for i in node.inputs]
        results = op.grad(e, node, g, wants)
        assert len(results) == len(node.inputs), \
            f"internal error: the gradient rule of {node.op} returned {len(results)} results"
        for inp, want, r in zip(node.inputs, wants, results):
            if want and r is not None:
                assert r.dtype == inp.dtype, f"internal error: gradient of {node.op} changes dtype"
                pending.setdefault(id(inp), []).append(sum_to(e, r, inp.shape))
    out = {}
    for w in wrt:
        g = total.get(id(w))
        if g is None:   # the loss does not depend on w
            e = Emit(w.loc, GRADIENT)
            g = e("broadcast_to", e.const(0.0, w.dtype), shape=w.shape)
        assert g.type == w.type, f"internal error: gradient of {w} has type {g.type}"
        out[w] = g
    return out


def backward_graph(graph: Graph, loss_name: str = "loss", inputs: Sequence[str] = ()) -> Graph:
    """The loss and its gradients (`grad NAME` outputs) for every parameter and named input."""
    loss = graph.output_map[loss_name]
    wrt = [n for n in topo_order([loss]) if n.op == "param" or
           (n.op == "input" and n.attr["name"] in inputs)]
    grads = derive_backward(loss, wrt)
    named = [(grad_output(w.attr["name"]), g) for w, g in grads.items()]
    outputs = [(loss_name, loss)] + [(name, g.relabeled(name=name)) for name, g in named]
    return Graph(f"{graph.name}.backward", tuple(outputs), graph.mode)
