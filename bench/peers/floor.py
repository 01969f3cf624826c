"""The GEMM-bound floor as a peer: one "step" calls numpy's BLAS once for every matrix product
of the workload's step, at its shapes and operand layouts, and nothing else. It is timed in the
round-robin like the others, so noise hits it the same way."""
from __future__ import annotations

import time

import numpy as np

from bench.peers import Runner
from bench.workloads import Workload, matmul_shapes


class FloorRunner(Runner):
    def __init__(self, w: Workload):
        rng = np.random.default_rng(0)
        self.shapes = matmul_shapes(w)
        self.calls = []
        for m, k, n, layout in self.shapes:
            # A transposed operand is a view of a row-major array, as `x.T @ g` is in a real step.
            a = rng.random((k, m), dtype=np.float32).T if layout == "tn" else rng.random(
                (m, k), dtype=np.float32)
            b = rng.random((n, k), dtype=np.float32).T if layout == "nt" else rng.random(
                (k, n), dtype=np.float32)
            self.calls.append((a, b, np.empty((m, n), dtype=np.float32)))

    def run(self, i: int):
        for a, b, out in self.calls:
            np.matmul(a, b, out=out)

    def details(self) -> dict:
        """Each product timed on its own (median of single calls): its time and GFLOP/s."""
        rows = []
        for (m, k, n, layout), (a, b, out) in zip(self.shapes, self.calls):
            np.matmul(a, b, out=out)
            repeat = max(3, min(200, int(2e8 / (2 * m * k * n + 1))))
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                np.matmul(a, b, out=out)
                times.append(time.perf_counter() - t0)
            median = float(np.median(times))
            rows.append({"m": m, "k": k, "n": n, "layout": layout, "us": median * 1e6,
                         "gflops": 2 * m * k * n / median / 1e9})
        return {"matmuls": rows, "blas": _blas_threads()}


def _blas_threads() -> list[dict]:
    try:
        import threadpoolctl
    except ImportError:
        return []
    return [{k: info.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
            for info in threadpoolctl.threadpool_info()]


def build(w: Workload, params, x, y, options) -> FloorRunner:
    return FloorRunner(w)
