"""The process group that `all_reduce` nodes reduce over. One process is a group of one, where an
all-reduce is the identity; data-parallel training (graphc.runtime.distributed) installs its MPI
communicator here, so the op's numpy reference, and with it every executor, reduces through it."""
from __future__ import annotations

from typing import Protocol

import numpy as np

OPS = ("mean", "sum")        # what `all_reduce(x, op=...)` may compute across the ranks


class Group(Protocol):
    """What an all-reduce needs of a process group: its size, this process's rank, and an
    in-place reduction of one contiguous buffer (every rank ends with the same bits)."""
    size: int
    rank: int

    def all_reduce(self, buffer: np.ndarray, op: str) -> None: ...


class SingleProcess:
    """The group of one process: nothing to reduce."""
    size, rank = 1, 0

    def all_reduce(self, buffer: np.ndarray, op: str) -> None:
        pass


_group: Group = SingleProcess()


def current() -> Group:
    return _group


def use(group: Group | None) -> Group:
    """Make `group` (None: a single process) the one all-reduces run over; returns the previous
    one, so a caller can put it back."""
    global _group
    previous, _group = _group, group or SingleProcess()
    return previous


def all_reduce(x: np.ndarray, op: str = "mean", out: np.ndarray | None = None) -> np.ndarray:
    """The numpy reference of `all_reduce`: `x` reduced over the current group, written into
    `out` (which may be `x` itself: the reduction is then in place, as MPI_IN_PLACE does it)."""
    if out is None:
        out = np.array(x, copy=True)
    elif out is not x:
        np.copyto(out, x)
    if not out.flags.c_contiguous:      # an MPI buffer is contiguous; the executors give one
        buffer = np.ascontiguousarray(out)
        _group.all_reduce(buffer, op)
        np.copyto(out, buffer)
    else:
        _group.all_reduce(out, op)
    return out


# The built-in losses, each a mean over its operands' rows (composites_losses.py): for an equal
# split of the batch, the mean of the shards' losses (and of their gradients) is the batch's.
BATCH_MEAN_LOSSES = frozenset({"mse", "nll", "cross_entropy", "binary_cross_entropy_with_logits"})


def not_a_batch_mean(loss) -> object | None:
    """The node of `loss` (a model's loss, before lowering) that keeps it from being a mean over
    the batch, or None where it is one: what data-parallel training (`all_reduce(op="mean")` of
    the ranks' gradients) assumes. A batch mean is a built-in mean loss (BATCH_MEAN_LOSSES) or
    `mean(...)` over all elements of a tensor whose first axis is the batch's (symbolic, `N`);
    sums, differences, negations,
    and products and quotients by terms that do not read the batch (a weight decay `c * l2(W)`,
    a constant) of such terms are batch means too. Anything else (`sum(...)`, a mean over some
    axes only, `sqrt(mse(...))`, a product of two batch terms) is not."""
    reads_batch: dict[int, bool] = {}

    def batch(node) -> bool:
        if id(node) not in reads_batch:
            reads_batch[id(node)] = node.op == "input" or any(batch(i) for i in node.inputs)
        return reads_batch[id(node)]

    def culprit(node):
        if not batch(node):
            return None
        if node.op in BATCH_MEAN_LOSSES:
            return None
        if node.op == "mean":     # over every element of a tensor that still has the batch's rows
            x = node.inputs[0]
            rows = x.type.ndim > 0 and isinstance(x.type.shape[0], str)
            return None if rows and node.type.ndim == 0 else node
        if node.op in ("add", "sub"):
            return next((c for c in map(culprit, node.inputs) if c is not None), None)
        if node.op == "neg":
            return culprit(node.inputs[0])
        if node.op == "mul" and sum(map(batch, node.inputs)) == 1:
            return culprit(next(i for i in node.inputs if batch(i)))
        if node.op == "div" and not batch(node.inputs[1]):
            return culprit(node.inputs[0])
        return node

    return culprit(loss)
