"""The second convolution of workload (g) as numpy's BLAS products, each asked for in both
orientations (C or Cᵀ): the measurements behind the orientation graphc gives a convolution's
weight gradient (docs/backends.md, "Convolutions": "The products' orientation").

    python bench/gemm_orientations.py [--rounds 3] [--calls 21]

Shapes at batch 64: weight W [64, 288], columns [288, 36864], gradient G [64, 36864]. Prints
each product's median over `--calls` calls per round, the rounds' median, and its GFLOP/s.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=21)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    pixels, out, k = 64 * 576, 64, 288
    w = rng.standard_normal((out, k), np.float32)
    cols = rng.standard_normal((k, pixels), np.float32)
    g = rng.standard_normal((out, pixels), np.float32)
    g_pixel_major = np.ascontiguousarray(g.T)
    y, yt = np.empty((out, pixels), np.float32), np.empty((pixels, out), np.float32)
    dw, dwt = np.empty((out, k), np.float32), np.empty((k, out), np.float32)
    dc, dct = np.empty((k, pixels), np.float32), np.empty((pixels, k), np.float32)
    cols_pixel_major = np.ascontiguousarray(cols.T)
    cases = [
        ("forward   W @ columns          -> [64, 36864]", lambda: np.matmul(w, cols, out=y)),
        ("forward   columnsᵀ @ Wᵀ (pixel-major columns) -> [36864, 64]",
         lambda: np.matmul(cols_pixel_major, w.T, out=yt)),
        ("weight    G @ columnsᵀ         -> [64, 288]", lambda: np.matmul(g, cols.T, out=dw)),
        ("weight    columns @ Gᵀ         -> [288, 64] (graphc)", lambda: np.matmul(cols, g.T, out=dwt)),
        ("columns   Wᵀ @ G               -> [288, 36864] (graphc)", lambda: np.matmul(w.T, g, out=dc)),
        ("columns   Gᵀ @ W               -> [36864, 288]", lambda: np.matmul(g.T, w, out=dct)),
        ("columns   Gᵀ @ W, G pixel-major -> [36864, 288]",
         lambda: np.matmul(g_pixel_major, w, out=dct)),
    ]
    flops = 2 * pixels * out * k
    results = {name: [] for name, _ in cases}
    for _ in range(args.rounds):
        for name, fn in cases:
            results[name].append(_median_ms(fn, args.calls))
    for name, times in results.items():
        ms = float(np.median(times))
        print(f"{name:62s} {ms:6.2f} ms {flops / ms / 1e6:6.1f} GFLOP/s  "
              f"(rounds: {', '.join(f'{t:.2f}' for t in times)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
