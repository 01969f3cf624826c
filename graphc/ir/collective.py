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
