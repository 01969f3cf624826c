"""IR invariants, checked after every pass when verification is on."""
from __future__ import annotations

from graphc.ir import ops as op_table
from graphc.ir.node import Graph


def verify_graph(graph: Graph) -> None:
    """Raise AssertionError ('internal error ...') naming the first node that breaks an invariant."""
    # Nodes are immutable, so a graph cannot have a cycle; what can go wrong is the order.
    placed: set[int] = set()
    for n in graph.nodes():
        assert all(id(i) in placed for i in n.inputs), \
            f"internal error: {n} comes before one of its inputs in graph {graph.name}"
        placed.add(id(n))
    sources: dict[tuple[str, str], object] = {}
    for n in graph.nodes():
        assert n.op in op_table.OPS, f"internal error: unknown op {n.op} in {graph.name}"
        op = op_table.OPS[n.op]
        if op.kind == "source":
            assert not n.inputs, f"internal error: source {n} has inputs"
            if n.op in ("input", "param", "state"):
                key = (n.op, n.attr["name"])
                other = sources.setdefault(key, n.type)
                assert other == n.type, (f"internal error: {n.op} {key[1]} appears as {other} and "
                                         f"{n.type}")
            continue
        operands = [op_table.Operand(i.type, i.label()) for i in n.inputs]
        try:
            again = op_table.infer_type(op, operands, n.attr)
        except op_table.TypeError_ as err:
            raise AssertionError(f"internal error: {n} no longer type-checks: {err.message}") from None
        assert again == n.type, f"internal error: {n} has type {n.type}, rules give {again}"
