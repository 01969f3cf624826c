"""Numerics checks of the training loop: where a non-finite value first appeared, and a loss that
runs away while staying finite.

`--check-numerics` (JAX's `debug_nans`): each step's parameters and state are kept before it
runs; when the step's loss or any value it writes back is not finite, the step is run again
node by node in numpy from what it started with, and the first node whose value is not finite
while its operands are is named by its `.nn` line. Without the flag a non-finite loss still
stops the run, with a hint to turn the check on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphc.errors import GraphcError, error
from graphc.files import source_line
from graphc.ir import OPS
from graphc.ir.node import Graph, Node
from graphc.ir.reference import evaluate_node

TRAIN_STEP = "train_step"


@dataclass(frozen=True)
class Snapshot:
    """What a train step starts from: enough to run it again."""
    params: dict[str, np.ndarray]
    state: dict[str, np.ndarray]
    step: int
    lr: float

    @classmethod
    def of(cls, program) -> Snapshot:
        return cls({k: v.copy() for k, v in program.params.items()},
                   {k: v.copy() for k, v in program.state.items()}, program.step, program.lr)


def all_finite(arrays) -> bool:
    return all(not np.issubdtype(a.dtype, np.floating) or bool(np.isfinite(a).all())
               for a in arrays)


def step_is_finite(program, loss: float) -> bool:
    """Is the loss, and every parameter and state value the step wrote back, finite?"""
    return (math.isfinite(loss) and all_finite(program.params.values())
            and all_finite(program.state.values()))


def locate_non_finite(program, snapshot: Snapshot, batch: dict[str, np.ndarray],
                      where: str) -> GraphcError:
    """The error for a step that made a non-finite value: `snapshot` and `batch` are what it
    started from, `where` says which step it was ("epoch 2, step 17")."""
    bad_inputs = [name for name, value in batch.items()
                  if np.issubdtype(np.asarray(value).dtype, np.floating)
                  and not np.isfinite(value).all()]
    if bad_inputs:
        name = bad_inputs[0]
        count = int((~np.isfinite(batch[name])).sum())
        return error(f"{where}: the batch's {name} already holds {count} non-finite value"
                     f"{'s' if count != 1 else ''}, before the model computed anything",
                     hint="the data set holds NaN or infinite values: clean them, or check the "
                          "scaling")
    bad_params = [n for n, v in snapshot.params.items() if not all_finite([v])]
    if bad_params:
        return error(f"{where}: parameter {bad_params[0]} was already not finite before the step")
    graph = program.graphs[TRAIN_STEP]
    values = program.step_values(batch, snapshot.params, snapshot.state, snapshot.step,
                                 snapshot.lr)
    found = first_non_finite(graph, values)
    if found is None:
        return error(f"{where}: the step made a non-finite value on the {program.backend} "
                     f"backend, but none when run again node by node in numpy",
                     hint="the backend and the reference disagree here: `graphc check "
                          "--backends` compares them on random inputs")
    node, value, operands = found
    return _culprit_error(node, value, operands, where, snapshot.lr)


def first_non_finite(graph: Graph, values: dict[str, np.ndarray]
                     ) -> tuple[Node, np.ndarray, list[np.ndarray]] | None:
    """Run `graph` node by node with the reference evaluator's `evaluate_node`; the first node (in topological
    order) whose float value is not finite while its operands are, with its value and operands.
    `values` holds every source's value by name, and the symbolic dimensions under `#dims`."""
    dims = values.get("#dims", {})
    computed: dict[int, np.ndarray] = {}
    with np.errstate(all="ignore"):       # the search expects infinities and NaNs
        for node in graph.nodes():
            if node.op == "const":
                out = np.asarray(node.attr["value"], dtype=node.dtype.numpy)
            elif OPS[node.op].kind == "source":
                out = np.asarray(values[node.attr["name"]])
            else:
                ins = [computed[id(i)] for i in node.inputs]
                out = evaluate_node(node, ins, dims)
                if not all_finite([out]) and all_finite(ins):
                    return node, out, ins
            computed[id(node)] = out
    return None


def _culprit_error(node: Node, value: np.ndarray, operands: list[np.ndarray], where: str,
                   lr: float) -> GraphcError:
    bad = ~np.isfinite(value)
    kinds = [k for k, present in (("NaN", np.isnan(value).any()),
                                  ("inf", np.isposinf(value).any()),
                                  ("-inf", np.isneginf(value).any())) if present]
    part = ("the gradient of " if "gradient" in node.tags
            else "the optimizer's update of " if "update" in node.tags else "")
    biggest = max((float(np.max(np.abs(o))) for o in operands if o.size
                   and np.issubdtype(o.dtype, np.floating)), default=0.0)
    what = (f"{where}: the first non-finite value comes from {node.op} in {part}"
            f"{'this line' if node.loc else 'a node with no source line'}: "
            f"{int(bad.sum())} of {value.size} values are {'/'.join(kinds)}, from finite operands"
            f" (largest magnitude {biggest:.3g})")
    hint = {"exp": "exp overflows above about 88 in f32: a log-sum-exp or a smaller learning "
                   "rate keeps its argument small",
            "log": "log of 0 or of a negative value: clamp its argument or use log_softmax",
            "div": "a division by zero: add a small epsilon to the divisor",
            "sqrt": "sqrt of a negative value",
            "pow": "a power that overflows or a fractional power of a negative value"}.get(
        node.op, f"the learning rate is {lr:g}: a smaller one may keep values in range")
    return error(what, loc=node.loc, hint=hint, line_text=source_line(node.loc))


class Divergence:
    """Watches the training loss for a run that stays finite but runs away: an epoch whose mean
    loss is more than FACTOR times the loss of the run's first step (the parameters as they
    were initialized: one step at a far too large learning rate already diverges) is reported,
    once. A resumed run starts watching again from its first step."""
    FACTOR = 10.0

    def __init__(self):
        self.start: float | None = None
        self.warned = False

    def observe(self, loss: float) -> None:
        if self.start is None:
            self.start = loss

    def check(self, epoch_loss: float, epoch: int, lr: float, schedule: str) -> str | None:
        """The warning for this epoch, once per run, or None."""
        start = self.start
        if self.warned or start is None or not math.isfinite(epoch_loss):
            return None
        if epoch_loss > self.FACTOR * abs(start) and epoch_loss - start > 1.0:
            self.warned = True
            return (f"the training loss is diverging: epoch {epoch}'s mean loss {epoch_loss:.4g} "
                    f"is {epoch_loss / abs(start) if start else math.inf:.3g} times the first "
                    f"step's ({start:.4g}), with the learning rate at {lr:g} ({schedule})")
        return None
