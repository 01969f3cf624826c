"""What data-parallel training costs a step: graphc's train step on 1 and on 2 MPI ranks (each
rank half of the same global batch), the all-reduce's share of the 2-rank step, its bandwidth,
and MPI's Allreduce of a buffer of that size alone; then, on paper, the step time at 8 and 64
ranks from those measured costs (docs/distributed.md).

    python bench/mpi.py [--workloads a,b] [--steps 30] [--backend llvm] [--ranks 2]

Workloads are bench/workloads.py's (a) mnist_mlp 784-256-10 at batch 64 and (b) 784-1024-1024-10
at batch 256, on random batches. Each configuration runs under `mpiexec -n R` (R = 1, then 2),
warms up, then times `--steps` steps; rank 0 prints one JSON line. Each rank's BLAS gets
cores / ranks threads. The all-reduce is timed after a barrier, so its time is the reduction's
and the wait for the slower rank is reported apart. Needs pip install -e '.[mpi]'.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WARMUP = 5


def worker(workload: str, steps: int, backend: str) -> None:
    """One rank of a measurement (run under mpiexec): rank 0 prints what it measured."""
    sys.path.insert(0, str(REPO))
    from bench.workloads import MODELS_DIR, WORKLOADS
    from graphc.api import build_program
    from graphc.compiler import check_source, read_source
    from graphc.mpi_cli import launched_size
    ranks = launched_size()
    group = None
    if ranks > 1:
        from graphc.runtime.distributed import connect
        group = connect()
    w = WORKLOADS[workload]
    path = MODELS_DIR / w.nn_file
    program = build_program(check_source(read_source(path), str(path)), None, backend, ranks=ranks)
    program.compile()
    rank = group.rank if group else 0
    rng = np.random.default_rng([1234, rank])
    local = w.batch // ranks
    x = rng.standard_normal((local, w.sizes[0])).astype(np.float32)
    y = rng.integers(0, w.sizes[-1], local)
    for _ in range(WARMUP):
        program.train_step(x=x, y=y)
    if group:
        group.comm.Barrier()
        group.calls, group.bytes, group.seconds = 0, 0, 0.0
        group.barrier_first = True
    start = time.perf_counter()
    for _ in range(steps):
        program.train_step(x=x, y=y)
    step = (time.perf_counter() - start) / steps
    result = {"workload": workload, "ranks": ranks, "backend": backend, "global_batch": w.batch,
              "step_ms": 1000 * step,
              "grad_bytes": 4 * sum(p.count for p in program.param_info.values())}
    if group:
        result["all_reduce_ms"] = 1000 * group.seconds / group.calls
        result["waited_ms"] = 1000 * group.waited / group.calls
        result["all_reduce_bytes"] = group.bytes // group.calls
        buffer = np.zeros(result["all_reduce_bytes"] // 4, np.float32)
        result["mpi_allreduce_ms"] = 1000 * _allreduce_alone(group, buffer, steps)
        # the slowest rank sets the step: take the maximum over ranks
        for key in ("step_ms", "all_reduce_ms", "waited_ms", "mpi_allreduce_ms"):
            result[key] = max(group.comm.allgather(result[key]))
    if rank == 0:
        print(json.dumps(result), flush=True)


def _allreduce_alone(group, buffer: np.ndarray, repeats: int) -> float:
    """Seconds per MPI Allreduce (in place, sum) of `buffer`, with nothing else running."""
    from mpi4py import MPI
    for _ in range(3):
        group.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    group.comm.Barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        group.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    return (time.perf_counter() - start) / repeats


def measure(workload: str, ranks: int, steps: int, backend: str) -> dict:
    from graphc.mpi_cli import mpiexec
    command = [mpiexec(), "-n", str(ranks), sys.executable, __file__, "--worker", workload,
               "--steps", str(steps), "--backend", backend]
    # the machine's cores shared out: each rank's BLAS gets cores / ranks threads
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PMI_")},
           "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def project(one: dict, two: dict, links: dict[str, float]) -> list[str]:
    """Step time at 8 and 64 ranks, global batch fixed: compute scales as 1/N from the 1-rank
    step; a ring all-reduce moves 2(N-1)/N of the gradient bytes per rank over each link."""
    lines = []
    compute = one["step_ms"]
    grad = two["all_reduce_bytes"]
    for name, gbps in links.items():
        for n in (8, 64):
            comm = 1000 * 2 * (n - 1) / n * grad / (gbps * 1e9)
            step = compute / n + comm
            lines.append(f"    {name:>26}: {n:>2} ranks: compute {compute / n:7.3f} ms + all-reduce "
                         f"{comm:7.3f} ms = {step:7.3f} ms ({compute / step:5.1f}x one rank)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="a,b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backend", default="llvm")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.backend)
        return
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"cores: {os.cpu_count()}, backend: {args.backend}, steps: {args.steps}", flush=True)
    for workload in args.workloads.split(","):
        one = measure(workload, 1, args.steps, args.backend)
        two = measure(workload, args.ranks, args.steps, args.backend)
        share = two["all_reduce_ms"] / two["step_ms"]
        mb = two["all_reduce_bytes"] / 1e6
        bus = 2 * (args.ranks - 1) / args.ranks
        print(f"({workload}) global batch {one['global_batch']}, gradient buffer {mb:.2f} MB")
        print(f"  1 rank : {one['step_ms']:8.3f} ms/step")
        speed = one["step_ms"] / two["step_ms"]
        print(f"  {args.ranks} ranks: {two['step_ms']:8.3f} ms/step ({speed:.2f}x), "
              f"all-reduce {two['all_reduce_ms']:.3f} ms = {100 * share:.1f}% of the step, "
              f"{mb / two['all_reduce_ms']:.2f} GB/s of buffer ({bus * mb / two['all_reduce_ms']:.2f} "
              f"GB/s moved per rank, ring 2(N-1)/N); before it, waiting for the slower rank "
              f"{two['waited_ms']:.3f} ms")
        print(f"  MPI Allreduce of the buffer alone: {two['mpi_allreduce_ms']:.3f} ms "
              f"({mb / two['mpi_allreduce_ms']:.2f} GB/s of buffer)")
        shared = two["all_reduce_bytes"] / (two["mpi_allreduce_ms"] / 1000) / 1e9
        print("  on paper, global batch fixed (docs/distributed.md):")
        for line in project(one, two, {f"this machine ({shared:.1f} GB/s)": shared,
                                       "100 Gb/s (12.5 GB/s)": 12.5, "10 Gb/s (1.25 GB/s)": 1.25}):
            print(line)
        print(json.dumps({"one": one, "two": two}), flush=True)


if __name__ == "__main__":
    main()
