"""The optimization pipeline: an ordered list of named, pure Graph -> Graph passes. Dumping the IR
after a pass and verifying after every pass are switches of the runner, not code in each pass; so
is the stage (before or after autodiff), which picks the form of the passes that differ by it."""
from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphc.ir.node import Graph
from graphc.ir.printer import format_graph
from graphc.ir.verify import verify_graph
from graphc.passes.cleanup import drop_stop_gradient
from graphc.passes.fold import fold_constants
from graphc.passes.rewrite import cse, decompose, train_mode  # noqa: F401 (re-exported)
from graphc.passes.simplify import simplify, simplify_composites, simplify_derived

log = logging.getLogger("graphc")


class Stage(enum.Enum):
    """Where a graph is in the compiler. BEFORE_AUTODIFF: it may still be differentiated (the
    model's graphs, the training graph); AFTER_AUTODIFF: autodiff derived it and it holds its
    gradients (loss_and_grads, train_step)."""
    BEFORE_AUTODIFF = "before autodiff"
    AFTER_AUTODIFF = "after autodiff"


def unchanged(graph: Graph) -> Graph:
    return graph


@dataclass(frozen=True)
class ByStage:
    """A pass whose form depends on the stage: `before` runs on graphs that may still be
    differentiated, `after` on graphs that hold their gradients."""
    before: Callable[[Graph], Graph]
    after: Callable[[Graph], Graph]

    def at(self, stage: Stage) -> Callable[[Graph], Graph]:
        return self.before if stage is Stage.BEFORE_AUTODIFF else self.after


Pass = tuple[str, "Callable[[Graph], Graph] | ByStage"]

PIPELINE: list[Pass] = [
    ("simplify_composites", simplify_composites),  # log(softmax) -> log_softmax
    ("decompose", decompose),                      # composites -> primitives: what backends run
    ("fold_constants", fold_constants),            # scalars over constants -> constants
    ("simplify", ByStage(simplify, simplify_derived)),  # algebra: x * 1, broadcasts, factor chains...
    ("drop_stop_gradient", ByStage(unchanged, drop_stop_gradient)),  # identities once differentiated
    ("cse", cse),                                  # one node per distinct computation
]


@dataclass
class PipelineOptions:
    verify: bool = False
    dump_after: Sequence[str] = ()
    dump: Callable[[str], None] = log.info   # the CLI passes print
    stage: Stage = Stage.BEFORE_AUTODIFF     # the compiler driver says which (compiler.lower_derived)


def pass_names() -> list[str]:
    return [name for name, _ in PIPELINE]


def run_pipeline(graph: Graph, options: PipelineOptions | None = None,
                 passes: Sequence[Pass] = PIPELINE) -> Graph:
    options = options or PipelineOptions()
    if options.verify:
        verify_graph(graph)
    for name, fn in passes:
        start = time.perf_counter()
        graph = (fn.at(options.stage) if isinstance(fn, ByStage) else fn)(graph)
        log.debug("pass %s: %d nodes in %.1f ms", name, len(graph.nodes()),
                  1e3 * (time.perf_counter() - start))
        if options.verify:
            verify_graph(graph)
        if name in options.dump_after:
            options.dump(f"; IR after {name}\n{format_graph(graph)}")
    return graph
