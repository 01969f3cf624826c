"""`graphc train` on several processes: `--ranks N` starts the command N times under MPICH's
mpiexec, and each process mpiexec started trains as one rank (graphc.runtime.distributed)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from graphc.errors import GraphcError, error

# The variables by which MPICH's, Open MPI's and PMIx's launchers tell a process the job's size.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


def launched_size() -> int:
    """How many ranks mpiexec started this process among (1 outside mpiexec)."""
    for name in _SIZE_VARS:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def should_launch(args) -> bool:
    return (args.ranks or 1) > 1 and launched_size() == 1


def _refuse_options(args, ranks: int) -> None:
    for flag, given in (("--check-numerics", args.check_numerics),
                        ("--track-norms", args.track_norms)):
        if given:
            raise error(f"{flag} runs on one process; this run has {ranks} ranks",
                        hint=f"leave out {flag}, or train on one process to use it")


def mpiexec() -> str | None:
    """The mpiexec of this Python's environment (pip's MPICH puts it beside python), else the
    one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.is_file() else shutil.which("mpiexec")


def launch(args) -> int:
    """Run this same command in `args.ranks` processes under mpiexec, on this machine; its exit
    status. Each of them sees mpiexec's environment and trains as one rank."""
    _refuse_options(args, args.ranks)
    program = mpiexec()
    if importlib.util.find_spec("mpi4py") is None or program is None:
        from graphc.runtime.distributed import INSTALL_HINT
        missing = "mpi4py" if program else "mpiexec"
        raise error(f"--ranks {args.ranks} starts {args.ranks} processes with MPI, but {missing} "
                    f"is not installed", hint=INSTALL_HINT)
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:]
    command = [program, "-n", str(args.ranks), sys.executable, "-m", "graphc", *argv]
    process = subprocess.Popen(command)
    try:
        status = process.wait()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached mpiexec and the ranks too (one process group): rank 0 says
        # where the run stands. A second SIGINT would be hydra's noisy "force abort", so it is
        # sent only where mpiexec did not end (the signal came to this process alone).
        for ending in (lambda: None, lambda: process.send_signal(signal.SIGINT), process.kill):
            ending()
            try:
                process.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                pass
        return 130
    if status not in (0, 1, 130):     # 1: a rank said why; else a rank died without a word
        print(f"graphc: a rank of the run stopped abnormally (mpiexec exit status {status}); "
              f"every rank was stopped", file=sys.stderr)
    return 1 if status else 0


def render(err: BaseException) -> str:
    """What a rank says of the error that stops the run (what graphc.cli.main says of it)."""
    if isinstance(err, GraphcError):
        return err.render()
    if isinstance(err, KeyboardInterrupt):
        return "graphc: interrupted"
    return (f"graphc: internal error: {type(err).__name__}: {err}\n"
            f"(this is a bug in graphc; rerun with --debug for a traceback)")


def run_rank(args, train) -> int:
    """train(args, group) as one rank of the mpiexec job this process belongs to."""
    size = launched_size()
    if args.ranks is not None and args.ranks != size:
        raise error(f"--ranks {args.ranks}, but mpiexec started {size} ranks",
                    hint=f"leave out --ranks under mpiexec, or run mpiexec -n {args.ranks}")
    _refuse_options(args, size)
    from graphc.runtime.distributed import connect, guarded
    group = connect()
    return guarded(group, lambda: train(args, group), render)


def other_ranks(path, started: int, now: int) -> GraphcError:
    """The error of a --resume on another number of ranks than the run was started with."""
    def ranks(n: int) -> str:
        return "1 process" if n == 1 else f"{n} ranks"
    how = "graphc train --resume RUN" if started == 1 else f"graphc train --resume RUN --ranks {started}"
    return error(f"{path}: the run was started on {ranks(started)}; it resumes on {ranks(started)} "
                 f"only (this is {ranks(now)}): a global batch split otherwise gives other sums",
                 hint=f"resume it with {how.replace('RUN', str(path))}")
