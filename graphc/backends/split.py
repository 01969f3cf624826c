"""A compiled backend runs a graph with `all_reduce` nodes in two parts, split at them: its native
code computes everything before the reduction (the gradients, flattened into one buffer), the host
reduces that buffer in place across the ranks (graphc.ir.collective: MPI's Allreduce), and native
code computes the rest (the optimizer's updates, in place). A kernel calling MPI itself would hold
the buffer, the arena and the GIL-free call across a blocking network wait; the split keeps MPI on
the host, where its errors and timeouts are Python's, at the cost of one more native call a step.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphc.ir import collective
from graphc.ir import ops as op_table
from graphc.ir.contract import Update
from graphc.ir.node import Graph, Node

REDUCE_OUTPUT = "#reduce{}"     # part 1's output: the buffer all-reduce i reduces
CUT_OUTPUT = "#cut{}"           # part 1's value that part 2 reads besides the reduced buffers


def has_collectives(graph: Graph) -> bool:
    return any(n.op == "all_reduce" for n in graph.nodes())


def split_at_collectives(graph: Graph) -> tuple[Graph, Graph, list[tuple[str, str]]]:
    """(part 1, part 2, [(buffer name, op)] per all-reduce): part 1 computes every output that
    no all-reduce precedes, the all-reduces' operands (`#reduce{i}`) and the values part 2 reads
    (`#cut{i}`); part 2 takes those as inputs of the same names (an all-reduce's result comes in
    as its operand's name) and computes the other outputs. Sources (inputs, parameters, state,
    constants) are read by each part itself."""
    order = graph.nodes()
    after: set[int] = set()
    reduces: list[Node] = []
    for node in order:
        if node.op == "all_reduce":
            assert id(node.inputs[0]) not in after, (
                f"internal error: an all-reduce of a reduced value ({node.label()}) cannot be split")
            reduces.append(node)
            after.add(id(node))
        elif any(id(i) in after for i in node.inputs):
            after.add(id(node))
    replaced: dict[int, Node] = {}
    first_outputs = [(name, n) for name, n in graph.outputs if id(n) not in after]
    for i, node in enumerate(reduces):
        name = REDUCE_OUTPUT.format(i)
        first_outputs.append((name, node.inputs[0]))
        replaced[id(node)] = op_table.source("input", node.type, name=name)
    cuts = 0
    rebuilt: dict[int, Node] = {}

    def part2(node: Node) -> Node:
        nonlocal cuts
        if id(node) in replaced:
            return replaced[id(node)]
        if id(node) in rebuilt:
            return rebuilt[id(node)]
        if id(node) not in after:
            if op_table.OPS[node.op].kind == "source":
                return node
            name = CUT_OUTPUT.format(cuts)
            cuts += 1
            first_outputs.append((name, node))
            replaced[id(node)] = op_table.source("input", node.type, name=name)
            return replaced[id(node)]
        new = op_table.rebuilt(node, [part2(i) for i in node.inputs])
        rebuilt[id(node)] = new
        return new

    for node in order:           # topological: every node's inputs are rebuilt before it
        if id(node) in after and node.op != "all_reduce":
            part2(node)
    second = Graph(f"{graph.name}.after_reduce",
                   tuple((name, part2(n)) for name, n in graph.outputs if id(n) in after), graph.mode)
    first = Graph(f"{graph.name}.before_reduce", tuple(first_outputs), graph.mode)
    return first, second, [(REDUCE_OUTPUT.format(i), n.attr["op"]) for i, n in enumerate(reduces)]


class SplitStep:
    """An executor's interface (`run(feeds, params, dims, state)`) over two executors of a
    compiled backend, one per part of `split_at_collectives`, with the all-reduce between them on
    the host. The train step's updates are the second part's: it writes them in place."""

    def __init__(self, executor, graph: Graph, updates: Sequence[Update] = ()):
        first, second, self.reduces = split_at_collectives(graph)
        self.graph = graph
        self.first = executor(first, ())
        self.second = executor(second, updates)
        self.parts = {"before_reduce": self.first, "after_reduce": self.second}

    def run(self, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray],
            dims: dict[str, int], state: dict[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        out = dict(self.first.run(feeds, params, dims, state))
        carried = {}
        for name, op in self.reduces:
            buffer = np.ascontiguousarray(out.pop(name))
            carried[name] = collective.all_reduce(buffer, op, out=buffer)    # in place
        carried.update((k, out.pop(k)) for k in [k for k in out if k.startswith("#cut")])
        out.update(self.second.run({**feeds, **carried}, params, dims, state))
        return out

    # What a Program asks of a compiled executor, answered by both parts.
    def compile(self, load: bool = True) -> None:
        for part in self.parts.values():
            part.compile(load)

    def cached_object(self) -> str:
        return self.first.cached_object()

    @property
    def dirty(self) -> bool:
        return any(getattr(p, "dirty", False) for p in self.parts.values())

    def sync_to_host(self, params: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> None:
        for part in self.parts.values():
            if getattr(part, "dirty", False):
                part.sync_to_host(params, state)


def make_executor(executor, graph: Graph, updates: Sequence[Update] = ()):
    """`executor(graph, updates)`, or for a compiled backend (one with `link`) and a graph with
    all-reduces, a SplitStep of two of them. The numpy backends run `all_reduce` by its reference."""
    if hasattr(executor, "link") and has_collectives(graph):
        return SplitStep(executor, graph, updates)
    return executor(graph, updates)


def linkable(executors: dict) -> dict:
    """The executors a compiled backend links into one module: a SplitStep's two parts in its
    place, under keys of their own."""
    out = {}
    for key, ex in executors.items():
        if isinstance(ex, SplitStep):
            out.update((f"{key}_{part}", p) for part, p in ex.parts.items())
        else:
            out[key] = ex
    return out
