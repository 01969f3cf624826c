"""GPU workloads, in one run: graphc's cuda backend beside PyTorch CUDA eager (and torch.compile
where it works) on the MNIST MLP at batch 64 and 1024 and the 784-1024-1024-10 MLP at batch 1024
(Adam train steps, timed two ways on both sides: the loss read back after every step, and the
steps queued with every loss read at the end, as `graphc train` and the course's loop do), and
a GEMM-only line at 4096 against cuBLAS through PyTorch (f32, and TF32 with --precision tf32).
Writes bench/results/gpu-TIME-DEVICE.json.

    python bench/gpu.py [--steps 200] [--precision f32|tf32] [--out FILE]

Without a GPU (or pycuda) it says which is missing and exits 1.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from graphc.targets import PRECISIONS

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "bench" / "models"
WORKLOADS = [("mnist_mlp_b64", "mnist_mlp.nn", 64), ("mnist_mlp_b1024", "mnist_mlp.nn", 1024),
             ("wide_mlp_b1024", "wide_mlp.nn", 1024)]
GEMM_N = 4096
GEMM_SOURCE = """model gemm {{
    input a: f32[N, {n}]
    param W: f32[{n}, {n}] = uniform(low=-0.01, high=0.01)
    y = a @ W
    output y
}}"""


class Unavailable(Exception):
    """What is missing for a GPU run, in one sentence."""


def _gpu() -> str:
    """The device's name, or Unavailable saying why there is none."""
    try:
        from graphc.backends.cuda.executor import CudaUnavailable, _driver
        _, device, _ = _driver()
    except CudaUnavailable as exc:
        raise Unavailable(str(exc).splitlines()[0].removeprefix("error: ")) from None
    return device.name()


def _batches(program, n: int, count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    classes = program.graphs["forward"].output_map[program.outputs[0]].shape[-1]
    (x, y) = program.train_inputs
    width = program.train_inputs[x].shape[1]
    return [{x: rng.standard_normal((n, width), dtype=np.float32), y: rng.integers(0, classes, n)}
            for _ in range(count)]


def graphc_train(model: str, n: int, steps: int, precision: str, queued: bool) -> float:
    """Milliseconds per train step of graphc's cuda backend: each loss read as its step returns,
    or (`queued`) the steps queued and their losses read at the end."""
    import graphc
    program = graphc.compile_file(MODELS / model, backend="cuda")
    program.use_precision(precision)
    batches = _batches(program, n, 8)
    for b in batches[:3]:                               # compile, upload, warm up
        program.train_step(**b)
    start = time.perf_counter()
    if queued:
        losses = [program.queue_train_step(**batches[i % len(batches)]) for i in range(steps)]
        sum(float(loss) for loss in losses)
    else:
        for i in range(steps):
            program.train_step(**batches[i % len(batches)])
    return (time.perf_counter() - start) / steps * 1e3


def _torch_mlp(model: str):
    import torch
    widths = [784, 256, 10] if model == "mnist_mlp.nn" else [784, 1024, 1024, 10]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).cuda()


def torch_train(model: str, n: int, steps: int, compiled: bool, queued: bool) -> float:
    """Milliseconds per train step of PyTorch CUDA (eager, or torch.compile'd): each loss read
    with .item() as its step returns, or (`queued`) all of them at the end."""
    import torch
    net = _torch_mlp(model)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.nll_loss(torch.log_softmax(net(x), dim=1), y)
        loss.backward()
        opt.step()
        return loss
    if compiled:
        step = torch.compile(step)
    rng = np.random.default_rng(0)
    host = [(torch.from_numpy(rng.standard_normal((n, 784), dtype=np.float32)).pin_memory(),
             torch.from_numpy(rng.integers(0, 10, n)).pin_memory()) for _ in range(8)]
    for x, y in host[:3]:
        step(x.cuda(non_blocking=True), y.cuda(non_blocking=True)).item()
    torch.cuda.synchronize()
    start = time.perf_counter()
    losses = []
    for i in range(steps):
        x, y = host[i % len(host)]
        loss = step(x.cuda(non_blocking=True), y.cuda(non_blocking=True))
        losses.append(loss.detach() if queued else loss.item())
    if queued:
        sum(loss.item() for loss in losses)
    return (time.perf_counter() - start) / steps * 1e3


def graphc_gemm(n: int, repeats: int, precision: str) -> float:
    """Milliseconds of graphc's GEMM kernel alone (its launch replayed on device buffers, timed
    with CUDA events: no host transfers)."""
    import graphc
    from graphc.backends.cuda import codegen
    from graphc.backends.cuda.executor import _current, _grid
    from graphc.backends.kernels.ir import sval
    program = graphc.compile_source(GEMM_SOURCE.format(n=n), backend="cuda")
    program.use_precision(precision)
    ex = program._executors["forward"]
    dims = {"N": n}
    with ex._code.lock, _current() as drv:
        ex._code.compile(drv)
        (launch,) = [launch for launch in ex._launches if launch.kind == "gemm"]
        rng = np.random.default_rng(0)
        held = []
        for b in launch.buffers:
            count = sval(ex.plan.buffers[b].elements, dims)
            held.append(drv.to_device(rng.standard_normal(count, dtype=np.float32)))
        dims_dev = drv.to_device(np.array([n], dtype=np.int64))
        status = drv.to_device(np.zeros(3, dtype=np.int64))
        args = [int(d) for d in held] + [int(dims_dev), int(status), launch.index]
        fn = ex._code.functions[launch.kernel]          # prepared (pointers, then the index)

        def run():
            fn.prepared_call(_grid(launch, dims), (codegen.GEMM_THREADS, 1, 1), *args)
        return _events(drv, run, repeats)


def _events(drv, run, repeats: int) -> float:
    for _ in range(3):
        run()
    begin, end = drv.Event(), drv.Event()
    begin.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return end.time_since(begin) / repeats


def torch_gemm(n: int, repeats: int, tf32: bool) -> float:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    for _ in range(3):
        a @ b
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / repeats


def _torch_reason() -> str | None:
    """Why PyTorch cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "torch was built without CUDA or sees no GPU"


def _attempt(fn, *args) -> dict:
    try:
        return {"ms": round(fn(*args), 4)}
    except Exception as exc:        # a peer failing (torch.compile without triton) is a result
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def run(steps: int, precision: str) -> dict:
    device = _gpu()
    no_torch = _torch_reason()
    rows = []
    for name, model, n in WORKLOADS:
        for queued in (False, True):
            row = {"workload": name, "batch": n, "losses": "at the end" if queued else "every step",
                   "graphc_cuda": _attempt(graphc_train, model, n, steps, precision, queued)}
            if no_torch is None:
                row["torch_eager"] = _attempt(torch_train, model, n, steps, False, queued)
                row["torch_compile"] = _attempt(torch_train, model, n, steps, True, queued)
                if "ms" in row["graphc_cuda"] and "ms" in row["torch_eager"]:
                    row["graphc_vs_eager"] = round(row["graphc_cuda"]["ms"] / row["torch_eager"]["ms"], 3)
            rows.append(row)
    flops = 2 * GEMM_N ** 3
    gemm = {"workload": f"gemm_{GEMM_N}", "graphc_cuda": _attempt(graphc_gemm, GEMM_N, 20, precision)}
    if no_torch is None:
        gemm["cublas"] = _attempt(torch_gemm, GEMM_N, 20, precision == "tf32")
    for impl in ("graphc_cuda", "cublas"):
        if "ms" in gemm.get(impl, {}):
            gemm[impl]["tflops"] = round(flops / gemm[impl]["ms"] / 1e9, 2)
    if "tflops" in gemm["graphc_cuda"] and "tflops" in gemm.get("cublas", {}):
        gemm["graphc_vs_cublas"] = round(gemm["graphc_cuda"]["tflops"] / gemm["cublas"]["tflops"], 3)
    rows.append(gemm)
    return {"device": device, "precision": precision, "steps": steps, "torch": no_torch or "ok",
            "command": " ".join(["python", "bench/gpu.py", *sys.argv[1:]]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="timed train steps per workload")
    p.add_argument("--precision", choices=PRECISIONS, default="f32",
                   help="graphc's GEMMs in f32 (default) or on the TF32 tensor cores")
    p.add_argument("--out", help="results file (default bench/results/gpu-TIME-DEVICE.json)")
    args = p.parse_args(argv)
    try:
        result = run(args.steps, args.precision)
    except Unavailable as exc:
        print(f"error: bench/gpu.py needs a CUDA GPU: {exc}", file=sys.stderr)
        return 1
    tag = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    out = Path(args.out) if args.out else (
        REPO / "bench" / "results" / f"gpu-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        cells = [f"{k} {v.get('ms', v.get('error'))}" for k, v in row.items() if isinstance(v, dict)]
        mode = f" (losses read {row['losses']})" if "losses" in row else ""
        print(f"{row['workload']:>16}{mode}: " + ", ".join(cells) + " (ms)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
