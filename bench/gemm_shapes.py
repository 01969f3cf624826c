"""graphc's generated GEMM (graphc/backends/llvm/gemm.py) against numpy's OpenBLAS, called by the
same compiled kernel, shape by shape: the measurements behind `gemm.profitable`, the rule that
picks one or the other (docs/backends.md, "Matrix products").

    python bench/gemm_shapes.py [--rounds 15] [--shapes conv|mlp|gpt|all] [--out FILE.json]

Each shape is one f32 product C = A @ B in a graph of its own, compiled twice for the llvm backend
in this process (GRAPHC_GEMM=blas and GRAPHC_GEMM=generated), both timed kernel by kernel (the
cycle counter around the product, as `graphc time` reads it) and run alternately, so both see the
same machine. Prints each one's median and GFLOP/s and their ratio (generated / BLAS time; below
1 the generated kernel is faster), and whether `profitable` picks the generated kernel there;
`--out` also writes the rows, the command and the machine's load as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# (name, M, K, N, A transposed): the products of the bundled models at their bench batch sizes
SHAPES = {
    "conv": [("mnist_cnn conv2 forward W @ columns", 64, 288, 36864, False),
             ("mnist_cnn conv2 input grad Wᵀ @ G", 288, 64, 36864, True),
             ("mnist_cnn conv1 forward W @ columns", 32, 9, 43264, False),
             ("mnist_cnn conv1, batch 1", 32, 9, 676, False),
             ("mnist_cnn conv2, batch 1", 64, 288, 576, False),
             ("mnist_cnn conv2, batch 8", 64, 288, 4608, False)],
    "mlp": [("mnist_mlp 784->512, batch 128", 128, 784, 512, False),
            ("mnist_mlp input grad, batch 128", 128, 512, 784, False),
            ("mnist_cnn linear 9216->128, batch 64", 64, 9216, 128, False),
            ("mlp 1024x1024, batch 1024", 1024, 1024, 1024, False),
            ("mlp weight grad Xᵀ @ G, batch 4096", 784, 4096, 512, True),
            ("wide layer 256->8192, batch 256", 256, 256, 8192, False),
            ("layer 384->1024, batch 256", 256, 384, 1024, False),
            ("layer 256->256, batch 256", 256, 256, 256, False)],
    "gpt": [("gpt qkv, 12x64 rows", 768, 128, 384, False),
            ("gpt mlp up", 768, 128, 512, False),
            ("gpt logits", 768, 128, 65, False),
            ("gpt attention out", 768, 128, 128, False),
            ("gpt mlp down", 768, 512, 128, False),
            ("gpt weight grad Xᵀ @ G", 128, 768, 512, True)],
}


def _graph(m: int, k: int, n: int, transposed: bool):
    from graphc.ir import ops as op_table
    from graphc.ir.node import Graph
    from graphc.ir.types import DType, TensorType
    from graphc.passes import PipelineOptions, run_pipeline
    a = op_table.source("input", TensorType(DType.f32, (k, m) if transposed else (m, k)), name="a")
    b = op_table.source("input", TensorType(DType.f32, (k, n)), name="b")
    left = op_table.apply("transpose", [a], {"axes": (1, 0)}) if transposed else a
    return run_pipeline(Graph("gemm", (("c", op_table.apply("matmul", [left, b])),)),
                        PipelineOptions(verify=True))


def _timed(graph, mode: str):
    """A program on `graph` whose forward executor is timed, compiled with GRAPHC_GEMM=mode."""
    from graphc.backends.llvm.executor import LLVMExecutor
    from graphc.runtime import Program
    os.environ["GRAPHC_GEMM"] = mode
    program = Program("gemm", {"forward": graph}, {}, {}, backend="llvm")
    executor = LLVMExecutor(graph, timed=True)
    executor.compile()
    program._executors["forward"] = executor
    product = next(i for i, k in enumerate(executor.plan.kernels) if k.matmul is not None)
    rate = executor.ticks_per_second()
    return program, lambda: executor.kernel_ticks()[product] / rate


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--shapes", choices=[*SHAPES, "all"], default="all")
    p.add_argument("--out", help="also write the results here as JSON")
    args = p.parse_args(argv)
    from graphc.backends.llvm import gemm
    rng = np.random.default_rng(0)
    groups = list(SHAPES) if args.shapes == "all" else [args.shapes]
    rows = []
    print(f"{'shape':40s} {'M':>5s} {'K':>5s} {'N':>6s}   {'BLAS ms':>8s} {'GF/s':>6s}   "
          f"{'generated':>9s} {'GF/s':>6s}   ratio  picked")
    for group in groups:
        for name, m, k, n, transposed in SHAPES[group]:
            graph = _graph(m, k, n, transposed)
            runs = {mode: _timed(graph, mode) for mode in ("blas", "generated")}
            feeds = {"a": rng.standard_normal((k, m) if transposed else (m, k)).astype(np.float32),
                     "b": rng.standard_normal((k, n)).astype(np.float32)}
            outputs = {mode: program.forward(**feeds)["c"] for mode, (program, _) in runs.items()}
            np.testing.assert_allclose(outputs["generated"], outputs["blas"], rtol=1e-3, atol=1e-3)
            times = {mode: [] for mode in runs}
            for i in range(args.rounds + 2):
                for mode in (("blas", "generated") if i % 2 else ("generated", "blas")):
                    program, read = runs[mode]
                    program.forward(**feeds)
                    if i >= 2:
                        times[mode].append(read())
            ms = {mode: float(np.median(t)) * 1e3 for mode, t in times.items()}
            flops = 2 * m * k * n
            picked = "generated" if gemm.picks(m, k, n) else "BLAS"
            rows.append({"shape": name, "m": m, "k": k, "n": n, "transposed": transposed,
                         "blas_ms": ms["blas"], "generated_ms": ms["generated"], "picked": picked})
            print(f"{name:40s} {m:5d} {k:5d} {n:6d}   {ms['blas']:8.3f} {flops / ms['blas'] / 1e6:6.1f}"
                  f"   {ms['generated']:9.3f} {flops / ms['generated'] / 1e6:6.1f}   "
                  f"{ms['generated'] / ms['blas']:5.2f}  {picked}")
    os.environ.pop("GRAPHC_GEMM", None)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python bench/gemm_shapes.py " + " ".join(argv),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load": os.getloadavg(),
                       "rounds": args.rounds, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
