"""Data-parallel training over MPI (mpi4py): the process group that the train step's `all_reduce`
reduces over, the start (rank 0's parameters broadcast), each rank's shard of every global batch,
and the loop's decisions (validation, early stopping, schedules) taken by rank 0 and broadcast.
Rank 0 alone writes the run folder. docs/distributed.md describes the design and its costs."""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np

from graphc.errors import GraphcError, error
from graphc.ir import collective
from graphc.runtime.data import batches
from graphc.runtime.train import KILL_AT_STEP, LoopState, Trainer

# Fault injection for the tests: only this rank honours KILL_AT_STEP.
KILL_RANK = "GRAPHC_FAULT_KILL_RANK"
INSTALL_HINT = "pip install -e '.[mpi]'"


class MPIGroup:
    """MPI_COMM_WORLD as the all-reduce's process group (graphc.ir.collective.Group). Counts
    what its all-reduces cost, for bench/mpi.py."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.calls, self.bytes, self.seconds = 0, 0, 0.0
        # This rank's part of the step's global batch, where the shards differ in size (an
        # epoch's last batch); None: equal shards.
        self.share: float | None = None
        # bench/mpi.py: a barrier first, timed apart, so `seconds` is the reduction alone and
        # `waited` the time this rank waited for the slowest to reach it
        self.barrier_first, self.waited = False, 0.0

    def all_reduce(self, buffer: np.ndarray, op: str) -> None:
        """Each rank's values are means over its shard of the global batch; `mean` makes them the
        global batch's: their mean where the shards are equal, else their sum weighted by each
        rank's share of the samples."""
        if self.barrier_first:
            start = time.perf_counter()
            self.comm.Barrier()
            self.waited += time.perf_counter() - start
        start = time.perf_counter()
        weighted = op == "mean" and self.share is not None
        if weighted:
            np.multiply(buffer, buffer.dtype.type(self.share), out=buffer)
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
        if op == "mean" and not weighted:
            np.divide(buffer, buffer.dtype.type(self.size), out=buffer)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.bytes += buffer.nbytes

    def broadcast_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rank 0's arrays, by name (every rank holds the same names, shapes and dtypes)."""
        out = {}
        for name in sorted(arrays):
            value = np.asarray(arrays[name])
            # (np.ascontiguousarray would make a 0-d array, the step count, 1-d)
            usable = value.flags.c_contiguous and value.flags.writeable
            buffer = value if usable else np.array(value, order="C")
            self.comm.Bcast(buffer, root=0)
            out[name] = buffer
        return out

    def broadcast(self, value):
        """Rank 0's plain (JSON-like) value on every rank."""
        return self.comm.bcast(value, root=0)

    def abort(self, code: int) -> None:
        self.comm.Abort(code)


def connect() -> MPIGroup:
    """The world communicator of this mpiexec job as the all-reduce group."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise error("this process was started by mpiexec, but mpi4py is not installed",
                    hint=INSTALL_HINT) from None
    group = MPIGroup(MPI.COMM_WORLD)
    collective.use(group)
    if group.rank != int(os.environ.get(KILL_RANK, "0")):
        os.environ.pop(KILL_AT_STEP, None)
    return group


def guarded(group: MPIGroup, body: Callable[[], int], render: Callable[[BaseException], str]) -> int:
    """body() on this rank; any error ends every rank at once (MPI_Abort), after this rank says
    why: a rank that stopped alone would leave the others waiting in their next collective
    forever. An error every rank meets alike (a bad flag) is said by rank 0 alone: the other
    ranks wait a moment for its abort before saying theirs."""
    try:
        return body()
    except BaseException as err:       # noqa: BLE001 (every way out must end the other ranks)
        if isinstance(err, SystemExit) and not err.code:
            raise
        if getattr(err, "every_rank", False):
            # Every rank stops here, with no collective pending: rank 0 says why, and the job
            # ends as a normal exit (MPI_Finalize), without MPI_Abort's own message.
            if group.rank == 0:
                print(render(err), file=sys.stderr, flush=True)
            return 1
        if group.rank and isinstance(err, GraphcError):
            time.sleep(10.0 if getattr(err, "relayed", False) else 1.0)
        prefix = "" if group.rank == 0 else f"rank {group.rank}: "
        if os.environ.get("GRAPHC_DEBUG"):
            traceback.print_exc()
        print(prefix + render(err) + f"\ngraphc: stopping all {group.size} ranks",
              file=sys.stderr, flush=True)
        code = 130 if isinstance(err, KeyboardInterrupt) else 1
        group.abort(code)
        os._exit(code)          # MPI_Abort has ended the job; never back into the caller


def agree(group: MPIGroup, body: Callable[[], object]):
    """body() on every rank (before any other collective), then what each met compared: its result
    where no rank met an error; an error that every rank met alike (a bad flag, a refused model)
    is raised marked `every_rank`, so rank 0 alone says it and the job ends without MPI_Abort;
    otherwise the ranks that met an error raise it and the others relay the first one's."""
    try:
        result, mine = body(), None
    except GraphcError as err:
        result, mine = None, err
    said = group.comm.allgather(None if mine is None else mine.render())
    if all(text is None for text in said):
        return result
    if mine is not None:
        if all(text == said[0] for text in said):
            mine.every_rank = True
        elif said[0] is None:
            mine.relayed = True         # rank 0 says it and ends the job: this rank waits for that
        raise mine
    first = next(rank for rank, text in enumerate(said) if text is not None)
    raise error(f"rank {first} stopped before training, the others not:\n{said[first]}")


def check_same_settings(group: MPIGroup, mine: dict) -> None:
    """Every rank must train with rank 0's settings (an MPMD launch may give ranks other flags);
    checked by every rank alike (all of them see all settings), before rank 0 creates the run
    folder, and again at the start of the loop."""
    every = group.comm.allgather(mine)
    for rank, settings in enumerate(every):
        if settings != every[0]:
            differ = sorted(k for k in settings.keys() | every[0].keys()
                            if settings.get(k) != every[0].get(k))
            err = error(f"rank {rank} trains with other settings than rank 0 "
                        f"({', '.join(differ)} differ)",
                        hint="every rank must read the same .nn file and flags")
            err.every_rank = True       # every rank saw every rank's settings: all stop here
            raise err


def check_ranks(batch: int, ranks: int) -> None:
    """What a run on `ranks` ranks needs of its global batch."""
    if batch % ranks:
        raise error(f"the global batch {batch} does not split evenly across {ranks} ranks",
                    hint=f"choose a batch that {ranks} divides (--batch "
                         f"{max(ranks, batch - batch % ranks)}), or another number of ranks")


class DistributedTrainer(Trainer):
    """A Trainer of one rank: its program's train step holds the all-reduce; this rank feeds it
    its shard of every global batch. Rank 0 (the one with a run folder) validates, decides and
    writes; the others take its decisions."""

    def __init__(self, group: MPIGroup, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        check_ranks(self.settings.batch, group.size)
        # Dropout masks are drawn from (seed, step) over the rows a process holds: each rank
        # keys its own (rank 0 the one-process run's), or every shard would get the same mask.
        if group.rank:
            self.program.seed = (self.settings.seed + group.rank * 0x9E3779B1) & 0x7FFFFFFF
        # Ctrl-C (SIGINT to every rank) is noted, and every rank stops at the same step: a rank
        # that left at once could leave another blocked in the step's all-reduce for ever.
        self.interrupted = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._note_interrupt)

    def _note_interrupt(self, signum, frame) -> None:
        self.interrupted = True

    def share_start(self) -> None:
        """Every rank starts from rank 0's parameters, optimizer state and loop state (drawn by
        it, or read from its checkpoint on --resume)."""
        check_same_settings(self.group, self.settings.to_json())
        program = self.program
        for name, value in self.group.broadcast_arrays(dict(program.params.items())).items():
            program.params[name] = value
        program.state = self.group.broadcast_arrays(dict(program.state))
        self._take_loop(self.group.broadcast(self.loop.to_json()))

    def _take_loop(self, loop: dict) -> None:
        self.loop = LoopState(**loop)
        self.saved_epochs = self.loop.epoch
        self.schedule.load_json(self.loop.schedule)
        self.program.lr = self.schedule.lr

    def epoch_order(self, n: int, epoch: int) -> list[np.ndarray]:
        """The global batches; one of fewer samples than ranks (an epoch's last) is left out,
        since a rank without samples has no mean to give."""
        order = batches(n, self.settings.batch, self.settings.seed, epoch)
        return [index for index in order if len(index) >= self.group.size]

    def shard(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This rank's rows of a global batch: the rank-th of `ranks` slices as equal as they can
        be; the group weights the all-reduce by the slice's share of the batch where they differ."""
        if self.group.comm.allreduce(self.interrupted, op=self.group.MPI.LOR):
            raise KeyboardInterrupt       # on every rank, before the same step
        rows, ranks, rank = len(next(iter(feed.values()))), self.group.size, self.group.rank
        start, stop = rows * rank // ranks, rows * (rank + 1) // ranks
        self.group.share = None if rows % ranks == 0 else (stop - start) / rows
        return {k: v[start:stop] for k, v in feed.items()}

    def end_epoch(self, row: dict) -> None:
        if self.group.rank == 0:
            super().end_epoch(row)
        loop = self.group.broadcast(self.loop.to_json() if self.group.rank == 0 else None)
        if self.group.rank:
            self._take_loop(loop)

    def finish(self) -> dict:
        self.check_same_parameters()
        scores = super().finish() if self.group.rank == 0 else None
        return self.group.broadcast(scores)

    def check_same_parameters(self) -> None:
        """Every rank must hold rank 0's parameters bit for bit (the same update of the same
        values); a rank that does not is a bug, said before rank 0 saves anything."""
        digest = hashlib.sha256()
        for name in sorted(self.program.params):
            digest.update(np.ascontiguousarray(self.program.params[name]).tobytes())
        digests = self.group.comm.allgather(digest.hexdigest())
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
        assert not differ, (f"internal error: the parameters of rank(s) {differ} differ from rank "
                            f"0's after training")
