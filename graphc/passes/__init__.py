"""The optimization pipeline: an ordered list of named, pure Graph -> Graph passes. Dumping the IR
after a pass and verifying after every pass are switches of the runner, not code in each pass."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphc.ir.node import Graph
from graphc.ir.printer import format_graph
from graphc.ir.verify import verify_graph
from graphc.passes.rewrite import cse, decompose, train_mode  # noqa: F401 (re-exported)

log = logging.getLogger("graphc")

Pass = tuple[str, Callable[[Graph], Graph]]

PIPELINE: list[Pass] = [
    ("decompose", decompose),    # composites -> primitives: what every backend runs
    ("cse", cse),                # one node per distinct computation
]


@dataclass
class PipelineOptions:
    verify: bool = False
    dump_after: Sequence[str] = ()
    dump: Callable[[str], None] = log.info   # the CLI passes print


def pass_names() -> list[str]:
    return [name for name, _ in PIPELINE]


def run_pipeline(graph: Graph, options: PipelineOptions | None = None,
                 passes: Sequence[Pass] = PIPELINE) -> Graph:
    options = options or PipelineOptions()
    if options.verify:
        verify_graph(graph)
    for name, fn in passes:
        start = time.perf_counter()
        graph = fn(graph)
        log.debug("pass %s: %d nodes in %.1f ms", name, len(graph.nodes()),
                  1e3 * (time.perf_counter() - start))
        if options.verify:
            verify_graph(graph)
        if name in options.dump_after:
            options.dump(f"; IR after {name}\n{format_graph(graph)}")
    return graph
