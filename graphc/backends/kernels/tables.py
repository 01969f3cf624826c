"""What the kernel planner leaves to a compiled backend's lowering table, and the checks that make a
missing entry name itself: before rendering, the graph node it would fail on; while rendering,
the op, dtype and operands (tinygrad's "failed to render {op} {dtype} {srcs}").

A compiled backend (llvm, cuda) exports `LOWER` (op name -> renderer of a kernel expression) and
`UNSUPPORTED` (primitives it declines); with `PLANNED` they cover every primitive
(tests/test_lowering_tables.py).
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from graphc.errors import Diagnostic, GraphcError
from graphc.ir.node import Graph

# The ops the planner (fuse.py) turns into kernel structure itself: buffers it reads and writes,
# strides, offsets, fills, reductions and matrix-product kernels. Every other primitive reaches a
# backend as an `Op` of a kernel expression, which the backend's lowering table renders.
PLANNED = frozenset({
    "input", "param", "state", "const", "size",                          # buffers and scalars
    "sum", "mean", "max", "matmul",                                      # reduced loops
    "reshape", "transpose", "broadcast_to", "window", "slice",           # strides and offsets
    "concat", "pad", "window_add",                                       # copies and fills
})


def check_lowerable(graph: Graph, backend: str, table: Mapping[str, Callable],
                    unsupported: Collection[str]) -> None:
    """Fail before any rendering on the first node of `graph` that `backend` cannot run: an op it
    declares unsupported is the user's error (with the node's location and another backend to
    try); an op in neither its table nor the planner's is an internal error naming the node."""
    for node in graph.nodes():
        if node.op in PLANNED:
            continue
        what = f"{node.op} {node.dtype.value} ({node.label()}" + (f" at {node.loc})" if node.loc else ")")
        if node.op in unsupported:
            raise GraphcError(Diagnostic(f"the {backend} backend does not run {node.op} "
                                         f"(computing {node.label()})", node.loc,
                                         hint="run it on the numpy backend: --backend numpy"))
        assert node.op in table, (f"internal error: the {backend} backend has no lowering for "
                                  f"{what}: add it to its LOWER table or to UNSUPPORTED")


def render_failure(backend: str, op: str, dtype, srcs: Sequence, where: str) -> AssertionError:
    """The error of a lowering-table lookup (or an entry's own lookup, a dtype it has no type
    for) that missed while rendering `op` in `where` (a kernel's name)."""
    dt = getattr(dtype, "value", dtype)
    operands = ", ".join(str(getattr(s, "value", s)) for s in srcs)
    return AssertionError(f"internal error: the {backend} backend failed to render {op} {dt} "
                          f"({operands}) in {where}")
