"""`graphc time`: where a step's time goes, kernel by kernel, as Caffe's `caffe time` shows it
layer by layer.

The program's train step (its forward graph when it has none) runs `iterations` times on random
inputs of the batch size; each time, a second executor of the same graph, built *timed*, runs the
same step and records every kernel's time (the llvm backend reads the cycle counter around each
kernel call inside the compiled graph; the numpy backend reads the clock after each of its calls
and after the parameter updates). The two runs alternate, so both see the same machine. Each
kernel is reported with the phase it belongs to (forward, backward: nodes of the derived gradient,
update: the optimizer's), the .nn lines its nodes come from, its floating-point operations and
rate, and its share of the step; the kernels' total stands beside the whole step measured on the
ordinary executor, where the difference is what the kernels do not cover (the Python call, the
feeds, copying outputs).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np

from graphc.errors import SourceLoc
from graphc.ir.node import Node
from graphc.ir.types import DType, bind_shape, symbols

PHASES = ("forward", "backward", "update")


@dataclass
class KernelTime:
    name: str                     # the kernel's name (llvm) or the op it runs (numpy)
    phase: str                    # forward | backward | update
    locs: list[SourceLoc]         # the distinct source lines of its nodes, first the stored ones
    flops: int
    seconds: float                # median over the iterations


@dataclass
class Timing:
    program: str
    graph: str                    # train_step or forward
    backend: str
    batch: int
    iterations: int
    kernels: list[KernelTime]
    step_seconds: float           # the whole step, median, on the ordinary executor
    total_seconds: float = 0.0    # the timed steps' kernels together, median over the steps
    fastest: tuple[float, float] = (0.0, 0.0)   # the fastest untimed step, the fastest timed total
    rss_mb: float | None = None   # the process's resident set before the first step (Linux)
    peak_rss_mb: float | None = None   # its peak (VmHWM) over the first step, reset before it

    @property
    def kernel_seconds(self) -> float:
        return sum(k.seconds for k in self.kernels)

    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)


def _phase(nodes: list[Node]) -> str:
    rank = max((2 if "update" in n.tags else 1 if "gradient" in n.tags else 0) for n in nodes)
    return PHASES[rank]


def _locs(primary: list[Node], nodes: list[Node]) -> list[SourceLoc]:
    lines: dict[tuple, SourceLoc] = {}
    for n in primary + nodes:
        if n.loc is not None:
            lines.setdefault((n.loc.file, n.loc.line), n.loc)
    return list(lines.values())


def node_flops(node: Node, dims: dict[str, int]) -> int:
    """Floating-point operations of one primitive node (the numpy backend's unit of work):
    a matrix product 2*M*K*N, an elementwise op one per element, a reduction one per element
    read; layout ops and loads none."""
    from graphc.ir import OPS
    kind = OPS[node.op].kind
    out = math.prod(bind_shape(node.shape, dims))
    if node.op == "matmul":
        return 2 * out * bind_shape(node.inputs[0].shape, dims)[-1]
    if node.op in ("sum", "mean", "max") and node.inputs:
        return math.prod(bind_shape(node.inputs[0].shape, dims))
    if node.op == "window_add":
        return math.prod(bind_shape(node.inputs[0].shape, dims))
    return out if kind in ("elementwise", "random") and node.op not in ("cast", "stop_gradient") else 0


def random_inputs(program, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The train inputs at batch size `batch`: floats standard normal, labels among the classes
    of the one_hot that reads them, bools at random."""
    from graphc.selfcheck import _label_depths
    depth = _label_depths(program.graphs.get("evaluate", program.graphs["forward"]))
    out = {}
    for name, ttype in program.train_inputs.items():
        shape = bind_shape(ttype.shape, {s: batch for s in symbols(ttype.shape)})
        if ttype.dtype is DType.bool:
            out[name] = rng.random(shape) < 0.5
        elif ttype.dtype.is_int:
            out[name] = rng.integers(0, depth.get(name, 2), shape).astype(ttype.dtype.numpy)
        else:
            out[name] = rng.standard_normal(shape).astype(ttype.dtype.numpy)
    return out


def time_program(program, batch: int, iterations: int, warmup: int = 2, seed: int = 0) -> Timing:
    """Time `program`'s train step (else its forward graph) at `batch`, `iterations` times after
    `warmup` untimed runs; see the module's docstring."""
    from graphc.runtime.program import executor_class
    key = "train_step" if "train_step" in program.graphs else "forward"
    graph = program.graphs[key]
    inputs = random_inputs(program, batch, np.random.default_rng(seed))
    if key == "forward":
        inputs = {name: inputs[name] for name in program.inputs}

    def step():
        return program.train_step(**inputs) if key == "train_step" else program.forward(**inputs)

    plain = program._executors[key]
    program.compile()             # native code loaded before the memory is measured
    rss, peak = _measured_step(step)
    timed = executor_class(program.backend)(graph, program.updates(key), timed=True)
    dims = dict.fromkeys({s for n in graph.nodes() for s in symbols(n.shape)}, batch)
    kernels, read = _kernels(timed, program.backend, dims)
    per_kernel, whole = [], []
    try:
        for i in range(warmup + iterations):
            # alternately first: the second of two steps in a row runs after the first one's
            # threads (the BLAS's, the kernels' worker), which can make it slower
            for run in ((plain, timed) if i % 2 else (timed, plain)):
                program._executors[key] = run
                t0 = time.perf_counter()
                step()
                t1 = time.perf_counter()
                if i >= warmup and run is plain:
                    whole.append(t1 - t0)
                elif i >= warmup:
                    per_kernel.append(read())
    finally:
        program._executors[key] = plain
    medians = np.median(np.array(per_kernel), axis=0)
    for k, seconds in zip(kernels, medians):
        k.seconds = float(seconds)
    totals = [float(np.sum(times)) for times in per_kernel]
    return Timing(program.name, key, program.backend, batch, iterations, kernels,
                  statistics.median(whole), statistics.median(totals), (min(whole), min(totals)),
                  rss, peak)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _measured_step(step) -> tuple[float | None, float | None]:
    """(resident set before, peak resident set during) one call of `step`, in MB: the peak is
    VmHWM, reset first through /proc/self/clear_refs (Linux; None elsewhere)."""
    rss = _status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        step()
        return rss, None
    step()
    return rss, _status_mb("VmHWM")


def _kernels(executor, backend: str, dims: dict[str, int]):
    """The kernels of a timed executor, and a function reading their last run's seconds."""
    if backend == "llvm":
        from graphc.backends.kernels.memory import kernel_flops
        executor.compile()
        rate = executor.ticks_per_second()
        kernels = []
        for k in executor.plan.kernels:
            stored = [s.node for s in k.stores if s.node is not None]
            kernels.append(KernelTime(k.name, _phase(k.nodes), _locs(stored, k.nodes),
                                      kernel_flops(k, dims), 0.0))
        return kernels, lambda: executor.kernel_ticks() / rate
    plan = executor.plan(dims)
    kernels = []
    for nodes in plan.step_nodes:
        if not nodes:             # no update groups: the last entry is empty
            kernels.append(KernelTime("(outputs)", "forward", [], 0, 0.0))
            continue
        name = nodes[0].op if len(nodes) == 1 else "updates"
        kernels.append(KernelTime(name, _phase(nodes), _locs(nodes, []),
                                  sum(node_flops(n, dims) for n in nodes), 0.0))
    return kernels, lambda: np.diff(plan.times)


def format_timing(t: Timing, source_lines: dict[str, list[str]] | None = None) -> str:
    """The report: a row per kernel in the order they run, the phases' totals, and the
    kernels' total beside the measured step."""
    source_lines = source_lines or {}
    step = t.kernel_seconds or 1e-12

    def where(locs: list[SourceLoc]) -> str:
        if not locs:
            return "-"
        first = locs[0]
        lines = source_lines.get(first.file)
        text = ""
        if lines and 0 < first.line <= len(lines):
            text = lines[first.line - 1][max(first.col - 1, 0):].split("#")[0].strip()
            text = " " + (text if len(text) <= 26 else text[:25] + "~")
        more = f" +{len(locs) - 1}" if len(locs) > 1 else ""
        return f"{first.file.rsplit('/', 1)[-1]}:{first.line}{more}{text}"

    rows = [("#", "phase", "kernel", "source", "ms", "share", "MFLOP", "GFLOP/s")]
    for i, k in enumerate(t.kernels):
        rate = k.flops / k.seconds / 1e9 if k.seconds > 0 and k.flops else 0.0
        rows.append((str(i), k.phase, k.name[:28], where(k.locs), f"{k.seconds * 1e3:.3f}",
                     f"{100 * k.seconds / step:.1f}%", f"{k.flops / 1e6:.2f}",
                     f"{rate:.1f}" if k.flops else "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    left = {1, 2, 3}
    out = [f"{t.program}: {t.graph}, backend {t.backend}, batch {t.batch}, median of "
           f"{t.iterations} iterations, {len(t.kernels)} kernels"]
    for r in rows:
        out.append("  " + "  ".join(v.ljust(w) if c in left else v.rjust(w)
                                    for c, (v, w) in enumerate(zip(r, widths))))
    out.append("")
    for phase in PHASES:
        ks = [k for k in t.kernels if k.phase == phase]
        if not ks:
            continue
        secs, flops = sum(k.seconds for k in ks), sum(k.flops for k in ks)
        out.append(f"  {phase:<9} {secs * 1e3:9.3f} ms  {100 * secs / step:5.1f}%  "
                   f"{flops / 1e6:10.2f} MFLOP  {flops / max(secs, 1e-12) / 1e9:7.1f} GFLOP/s  "
                   f"({len(ks)} kernels)")
    total, whole = t.total_seconds, t.step_seconds
    out.append(f"  kernels   {total * 1e3:9.3f} ms  {t.flops / 1e6:.2f} MFLOP, "
               f"{t.flops / max(total, 1e-12) / 1e9:.1f} GFLOP/s (the timed steps' median total)")
    out.append(f"  step      {whole * 1e3:9.3f} ms  measured (whole {t.graph.replace('_', ' ')}, "
               f"untimed); the kernels are {100 * total / whole:.1f}% of it")
    if t.peak_rss_mb is not None and t.rss_mb is not None:
        out.append(f"  memory    peak resident set {t.peak_rss_mb:.1f} MB over the first step, "
                   f"{t.peak_rss_mb - t.rss_mb:.1f} MB over the {t.rss_mb:.1f} MB before it "
                   f"(the planned peak: graphc build --stats)")
    return "\n".join(out)
