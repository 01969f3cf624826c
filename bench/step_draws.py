"""Time a model's train step on the llvm backend in several fresh processes, one line each: how
much a process's speed is a draw on this machine (README, Benchmarks: why `python -m bench` is
quoted with `--procs 4`).

    python bench/step_draws.py [MODEL.nn] [--processes 6] [--steps 60] [--batch B]

Each process compiles the model (from the build cache after the first), runs 5 untimed steps,
then times `--steps` steps on one fixed random batch and prints their median and minimum.
Environment variables reach every process (OPENBLAS_NUM_THREADS=1, GRAPHC_THREADS=1 to compare).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def one_process(model: str, steps: int, batch: int) -> None:
    import graphc
    program = graphc.compile_file(model, backend="llvm")
    rng = np.random.default_rng(0)
    feeds = {}
    for node in program.graphs["train_step"].inputs:
        name = node.attr["name"]
        if name.startswith("#"):
            continue
        shape = tuple(batch if isinstance(d, str) else d for d in node.type.shape)
        if node.type.dtype.is_float:
            feeds[name] = rng.standard_normal(shape).astype(node.type.dtype.numpy)
        else:       # labels and token ids: small non-negative integers every model here accepts
            feeds[name] = rng.integers(0, 10, shape).astype(node.type.dtype.numpy)
    for _ in range(5):
        program.train_step(**feeds)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        program.train_step(**feeds)
        times.append(time.perf_counter() - start)
    print(f"median {np.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms", flush=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "bench" / "models" / "gpt.nn"))
    p.add_argument("--processes", type=int, default=6)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        one_process(args.model, args.steps, args.batch)
        return 0
    for i in range(args.processes):
        out = subprocess.run([sys.executable, __file__, args.model, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--child"],
                             capture_output=True, text=True, check=False)
        print(f"process {i + 1}: {out.stdout.strip() or out.stderr.strip().splitlines()[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
