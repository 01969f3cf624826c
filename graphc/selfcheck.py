"""`graphc check FILE --backends numpy,llvm[,cuda]`: a model's graphs run on each named backend and
on the reference evaluator (graphc/ir/reference.py) from the same parameters and random inputs,
compared value by value: the forward graph, the loss and its gradients, and three train steps
(the loss, then every parameter and optimizer state slot after each step). Parameters are random
(normal; std 1/sqrt(rows) for matrices, 0.1 otherwise) rather than as initialized, so that no
weight starting at zero hides the ops it feeds; running statistics keep their initial values.

A value's difference is normwise: rms(got - want) / rms(want), the root mean square of the error
over that of the expected value, so that rounding spread over many elements, or a few near-zero
gradients that an adaptive optimizer turns into full steps of opposite sign, stays small while a
wrong lowering (off everywhere, or off by much in a few elements) does not. The denominator is at
least a thousandth of the largest rms of the values of the same graph: a gradient that cancels to
zero in exact arithmetic (a bias before batch norm) is only rounding noise in both. Non-finite
elements must be the same (nan for nan, inf for the same inf); integers and bools equal.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from graphc.api import build_program
from graphc.compiler import CheckedFile
from graphc.errors import GraphcError, error
from graphc.ir.contract import grad_output
from graphc.ir.node import Graph
from graphc.ir.reference import ReferenceExecutor
from graphc.ir.types import DType, bind_shape, symbols
from graphc.runtime.program import Program
from graphc.targets import BACKEND_NAMES

# The largest normwise difference allowed, by the value's dtype. A backend may contract into FMAs,
# sum in another order (vector lanes, blocking, a BLAS) and call another libm: a few ulps per
# operation (f32 2**-24 ~ 6e-8, f64 2**-53 ~ 1.1e-16) through a network's depth and sums of
# thousands of terms, then through three optimizer steps, stay two orders of magnitude below these;
# a wrong lowering is off by far more (1e-2 and up).
TOLERANCES = {DType.f16: 1e-2, DType.f32: 1e-4, DType.f64: 1e-10}
TRAIN_STEPS = 3
BATCH = 4               # every symbolic size (the batch N); batch norm needs at least 2
FLOOR = 1e-3            # of the graph's largest rms: the smallest denominator of a difference
_LAYOUT = ("reshape", "cast", "transpose", "broadcast_to", "slice")


@dataclass(frozen=True)
class GraphCheck:
    """One graph run on one backend against the reference evaluator."""
    backend: str
    graph: str                 # forward, loss_and_grads, train_step 1, ...
    value: str                 # the value with the largest difference (relative to its tolerance)
    difference: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.difference <= self.tolerance


class BackendUnavailable(Exception):
    """The backend cannot run here (no llvmlite; no pycuda, driver or GPU): why."""


def parse_backends(text: str) -> tuple[list[str], bool]:
    """The backends of --backends (names separated by commas, or `all`), and whether they were
    named explicitly (`all` skips those that cannot run here instead of failing)."""
    if text.strip() == "all":
        return list(BACKEND_NAMES), False
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKEND_NAMES]
    if unknown or not names:
        raise error(f"--backends: unknown backend '{unknown[0]}'" if unknown
                    else "--backends: name at least one backend",
                    hint=f"backends: {', '.join(BACKEND_NAMES)} (or all)")
    return list(dict.fromkeys(names)), True


def check_backends(checked: CheckedFile, model: str | None, backends: Sequence[str],
                   seed: int = 0, on_result: Callable[[GraphCheck], None] | None = None,
                   on_unavailable: Callable[[str, str], None] | None = None) -> list[GraphCheck]:
    """Every graph check of `model` on each backend; `on_result` sees each as it is made. A backend
    that cannot run here raises BackendUnavailable, unless `on_unavailable(backend, why)` takes it."""
    base = build_program(checked, model, "numpy", seed)
    rng = np.random.default_rng(seed)
    for name, value in list(base.params.items()):
        # Random, not as initialized: a weight that starts at zero would hide the ops it feeds.
        # Running statistics (batch norm's mean and variance) stay valid: as initialized.
        if base.param_info[name].role == "stat":
            continue
        std = 1 / math.sqrt(value.shape[0]) if value.ndim >= 2 else 0.1
        base.params[name] = (rng.standard_normal(value.shape) * std).astype(value.dtype)
    results = []
    reference = _reference(base)
    expected: dict = {}         # the reference's results, each computed once
    for backend in backends:
        try:
            for result in _check_one(base, backend, seed, reference, expected):
                results.append(result)
                if on_result:
                    on_result(result)
        except BackendUnavailable as why:
            if on_unavailable is None:
                raise
            on_unavailable(backend, str(why))
    return results


def _twin(base: Program, backend: str) -> Program:
    """`base`'s graphs, parameters and state on another backend, sharing no array with it."""
    values = {name: np.array(value) for name, value in base.params.items()}
    return Program(base.name, base.graphs, base.param_info, values, backend=backend,
                   meta=base.meta, state=base.state_info, train_step=base.train_step_contract)


def _reference(base: Program) -> Program:
    program = _twin(base, "numpy")
    # The same Program, its graphs run by the oracle instead of the numpy backend.
    program._executors = {key: ReferenceExecutor(g) for key, g in program.graphs.items()}
    return program


def _check_one(base: Program, backend: str, seed: int, want: Program, expected: dict):
    """The checks of one backend against `want` (the reference); `expected` keeps the reference's
    results (and the parameters whose gradient vanishes) for the next backend."""
    got = _twin(base, backend)
    rng = np.random.default_rng(seed)
    batches = [random_batch(base, rng) for _ in range(TRAIN_STEPS)]
    features = {k: v for k, v in batches[0].items() if k in base.inputs}
    vanishing: set[str] = expected.setdefault("vanishing parameters", set())

    def run(graph: str, call: Callable[[Program], dict[str, np.ndarray]]) -> GraphCheck:
        if graph not in expected:
            expected[graph] = call(want)
        try:
            result = call(got)
        except GraphcError as err:
            if backend == "cuda":
                from graphc.backends.cuda.executor import CudaUnavailable
                if isinstance(err, CudaUnavailable):
                    raise BackendUnavailable(err.diagnostics[0].message) from None
            raise
        except ImportError as err:
            raise BackendUnavailable(f"the {backend} backend needs {err.name}, which is not "
                                     f"installed") from None
        return compare(backend, graph, result, expected[graph])

    # Losses come back as Python floats: compared in the loss's own dtype.
    loss_dtype = next((g.output_map["loss"].dtype.numpy for g in base.graphs.values()
                       if "loss" in g.output_map), np.float64)
    yield run("forward", lambda p: p.forward(**features))
    if "loss_and_grads" in base.graphs:
        def loss_and_grads(p: Program) -> dict[str, np.ndarray]:
            loss, grads = p.loss_and_grads(**batches[0])
            if p is want:
                vanishing.update(_vanishing(grads))
            return {"loss": np.asarray(loss, loss_dtype)} | {grad_output(k): v for k, v in grads.items()}
        yield run("loss_and_grads", loss_and_grads)
    if "train_step" in base.graphs:
        for t, batch in enumerate(batches, start=1):
            def step(p: Program, batch=batch) -> dict[str, np.ndarray]:
                loss = p.train_step(**batch)
                return ({"loss": np.asarray(loss, loss_dtype)}
                        | {k: np.array(v) for k, v in p.params.items() if k not in vanishing}
                        | {f"state {k}": np.array(v) for k, v in p.state.items()})
            yield run(f"train_step {t}", step)


def _vanishing(grads: dict[str, np.ndarray]) -> list[str]:
    """The parameters whose gradient is rounding noise: rms below FLOOR of the largest one's (a
    bias before batch norm, which the normalization cancels). An adaptive optimizer moves such a
    parameter by a full step of the noise's sign, different on every backend, so train steps leave
    it out (its optimizer state, as small as its gradient, is still compared)."""
    rms = {k: _rms(np.asarray(g, np.float64)) for k, g in grads.items()}
    largest = max(rms.values(), default=0.0)
    return [k for k, r in rms.items() if r <= FLOOR * largest]


def random_batch(program: Program, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs for every graph of `program`: floats standard normal, integer labels drawn among
    the classes of the one_hot that reads them (0 or 1 where none does), bools at random;
    every symbolic size BATCH."""
    inputs = program.train_inputs
    depth = _label_depths(program.graphs.get("evaluate", program.graphs["forward"]))
    out = {}
    for name, ttype in inputs.items():
        shape = bind_shape(ttype.shape, {s: BATCH for s in symbols(ttype.shape)})
        dtype = ttype.dtype.numpy
        if ttype.dtype is DType.bool:
            out[name] = rng.random(shape) < 0.5
        elif ttype.dtype.is_int:
            out[name] = rng.integers(0, depth.get(name, 2), shape).astype(dtype)
        else:
            out[name] = rng.standard_normal(shape).astype(dtype)
    return out


def _label_depths(graph: Graph) -> dict[str, int]:
    depth: dict[str, int] = {}
    for node in graph.nodes():
        if node.op == "one_hot":
            x = node.inputs[0]
            while x.op in _LAYOUT:
                x = x.inputs[0]
            if x.op == "input":
                name = x.attr["name"]
                depth[name] = min(depth.get(name, node.attr["depth"]), node.attr["depth"])
    return depth


def _rms(x: np.ndarray) -> float:
    return math.sqrt(float(np.mean(np.square(x)))) if x.size else 0.0


def compare(backend: str, graph: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]
            ) -> GraphCheck:
    """The value of `got` furthest from `want`, relative to its tolerance (module docstring)."""
    assert got.keys() == want.keys(), f"internal error: {backend} {graph}: {sorted(got)} != {sorted(want)}"
    floats = {k: np.asarray(v, np.float64) for k, v in want.items() if np.asarray(v).dtype.kind == "f"}
    finite = {k: np.where(np.isfinite(v), v, 0.0) for k, v in floats.items()}
    scale = FLOOR * max((_rms(v) for v in finite.values()), default=0.0)
    worst = GraphCheck(backend, graph, "", 0.0, TOLERANCES[DType.f32])
    for name, expected in want.items():
        w, g = np.asarray(expected), np.asarray(got[name])
        if w.dtype.kind != "f":
            same = g.shape == w.shape and bool(np.array_equal(g, w))
            diff, tol = (0.0 if same else math.inf), 0.0
        else:
            tol = TOLERANCES[DType.from_numpy(w.dtype)]
            diff = _difference(g, w, scale) if g.shape == w.shape else math.inf
        ratio = diff / tol if tol else (0.0 if diff == 0 else math.inf)
        if not worst.value or ratio > worst.difference / worst.tolerance:
            worst = GraphCheck(backend, graph, name, diff, tol or TOLERANCES[DType.f32])
    return worst


def _difference(got: np.ndarray, want: np.ndarray, scale: float) -> float:
    g, w = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(w) & np.isfinite(g)
    same_special = (np.isnan(g) & np.isnan(w)) | (np.isinf(w) & (g == w))
    if not np.all(finite | same_special):
        return math.inf
    g, w = g[finite], w[finite]
    error = _rms(g - w)
    return error / max(_rms(w), scale) if error else 0.0


def format_result(r: GraphCheck) -> str:
    status = "ok" if r.ok else "FAILED"
    return (f"  {r.backend:<6} {r.graph:<15} {r.difference:>10.3g}  {r.tolerance:>9.0e}  "
            f"{status:<6} {r.value}")


HEADER = (f"  {'backend':<6} {'graph':<15} {'difference':>10}  {'tolerance':>9}  "
          f"{'':<6} worst value")
