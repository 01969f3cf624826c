"""`graphc check --grad`: the derived gradients of a model's loss against central finite
differences, in float64, at a random point.

The model is re-built with every float promoted to f64 (the derivative is the same function; only
the rounding shrinks), in training mode with a fixed random key, so dropout masks are the same in
every evaluation. Parameters start from their initializers (biases at zero included: a realistic
point), inputs are standard normal, labels uniform over the classes. Each parameter's derived
gradient is compared on up to `samples` elements (all of them for small parameters) with
(L(p + h) - L(p - h)) / 2h, h = cbrt(eps) * max(1, |p|), the step that balances truncation and
rounding error for a central difference. Where they disagree, the element is measured again with
steps 10 and 100 times smaller: a ReLU or a max-pool window whose kink lies within h of the point
makes the wide difference wrong while the derivative is right (and a wrong rule stays wrong at
every step).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from graphc.autodiff import backward_graph
from graphc.backends.numpy.executor import NumpyExecutor
from graphc.compiler import CheckedFile, lower, lower_derived
from graphc.initializers import initialize
from graphc.ir import OPS
from graphc.ir import ops as op_table
from graphc.ir.contract import FED_INPUTS, RNG_INPUT, grad_output, rng_key
from graphc.ir.node import Graph, Node
from graphc.ir.types import DType, TensorType
from graphc.passes.rewrite import rewrite, train_mode

STEP = float(np.finfo(np.float64).eps) ** (1 / 3)
RTOL, ATOL = 1e-5, 1e-8      # the f64 check: far below any real gradient mistake, far above noise
BATCH = 4


@dataclass(frozen=True)
class ParamCheck:
    name: str
    shape: tuple[int, ...]
    checked: int                   # elements compared
    max_abs: float
    max_rel: float
    worst: tuple[int, ...]         # the element furthest out of tolerance
    derived: float                 # the two values there
    numeric: float
    ok: bool


def to_float64(graph: Graph) -> Graph:
    """`graph` with every float type (sources, constants, dtype attributes) made f64."""
    def f64(dtype: DType) -> DType:
        return DType.f64 if dtype.is_float else dtype

    def visit(node: Node, inputs: list[Node]) -> Node:
        op = OPS[node.op]
        if op.kind == "source":
            return replace(node, type=TensorType(f64(node.type.dtype), node.type.shape))
        attrs = {k: (f64(DType(v)).value if op.attrs[k].kind == "dtype" and v is not None else v)
                 for k, v in node.attr.items()}
        return op_table.apply(node.op, inputs, attrs, loc=node.loc, name=node.name, tags=node.tags)
    return rewrite(graph, visit)


def check_gradients(checked: CheckedFile, model: str | None = None, seed: int = 0,
                    samples: int = 32) -> tuple[str, list[ParamCheck]]:
    """(the model's name, one ParamCheck per parameter)."""
    ir = checked.pick(model)
    if ir.loss is None:
        raise ValueError(f"model {ir.name} has no loss to differentiate; declare `loss = ...`")
    training = lower(to_float64(train_mode(Graph(ir.name, (("loss", ir.loss),)))))
    loss_fn = NumpyExecutor(training)
    grads_fn = NumpyExecutor(lower_derived(backward_graph(training)))
    rng = np.random.default_rng(seed)
    feeds = _feeds(training, ir, rng)
    feeds[RNG_INPUT] = np.int64(rng_key(seed, 0))
    params = {name: initialize(name, p.type.shape, np.float64 if p.type.dtype.is_float else
                               p.type.dtype.numpy, p.init, seed) for name, p in ir.params.items()}
    dims = {sym: BATCH for sym in _symbols(training)}
    derived = grads_fn.run(feeds, params, dims)

    def central(name: str, idx: tuple, h: float) -> float:
        up, down = dict(params), dict(params)
        up[name], down[name] = params[name].copy(), params[name].copy()
        up[name][idx] += h
        down[name][idx] -= h
        return (float(loss_fn.run(feeds, up, dims)["loss"])
                - float(loss_fn.run(feeds, down, dims)["loss"])) / (2 * h)

    results = []
    for name, value in params.items():
        if ir.params[name].role == "stat":      # set by training steps, not by gradients
            continue
        grad = derived.get(grad_output(name))
        if grad is None:                         # the loss does not depend on it
            grad = np.zeros_like(value)
        flat = list(np.ndindex(value.shape)) or [()]
        picks = (range(len(flat)) if len(flat) <= samples
                 else rng.choice(len(flat), size=samples, replace=False))
        worst, worst_excess, max_abs, max_rel = flat[0], -np.inf, 0.0, 0.0
        pair = (0.0, 0.0)
        for k in picks:
            idx = flat[k]
            h = STEP * max(1.0, abs(float(value[idx])))
            got = float(grad[idx])
            numeric = central(name, idx, h)
            for shrink in (10.0, 100.0):          # a kink within h: look closer
                if abs(got - numeric) <= ATOL + RTOL * abs(numeric):
                    break
                closer = central(name, idx, h / shrink)
                if abs(got - closer) < abs(got - numeric):
                    numeric = closer
            err = abs(got - numeric)
            max_abs = max(max_abs, err)
            # Relative to the gradient, or to the absolute tolerance where it is (nearly) zero:
            # a bias before batch norm has none, and 1e-17 / 1e-11 says nothing.
            max_rel = max(max_rel, err / max(abs(numeric), ATOL))
            excess = err - (ATOL + RTOL * abs(numeric))
            if excess > worst_excess:
                worst, worst_excess, pair = idx, excess, (got, numeric)
        results.append(ParamCheck(name, tuple(value.shape), len(picks), max_abs, max_rel,
                                  tuple(int(i) for i in worst), pair[0], pair[1], worst_excess <= 0))
    return ir.name, results


def _symbols(graph: Graph) -> set[str]:
    return {d for n in graph.nodes() if n.op == "input" for d in n.type.shape if isinstance(d, str)}


def _feeds(graph: Graph, ir, rng: np.random.Generator) -> dict[str, np.ndarray]:
    classes = next((o.type.shape[-1] for o in ir.outputs.values()
                    if o.type.ndim >= 1 and isinstance(o.type.shape[-1], int)), 2)
    feeds = {}
    for node in graph.nodes():
        if node.op != "input" or node.attr["name"] in FED_INPUTS:
            continue
        shape = [BATCH if isinstance(d, str) else d for d in node.type.shape]
        dtype = node.type.dtype
        if dtype.is_int:
            feeds[node.attr["name"]] = rng.integers(0, classes, shape).astype(dtype.numpy)
        elif dtype is DType.bool:
            feeds[node.attr["name"]] = rng.random(shape) < 0.5
        else:
            feeds[node.attr["name"]] = rng.standard_normal(shape)
    return feeds


def format_table(model: str, results: list[ParamCheck]) -> str:
    rows = [("parameter", "shape", "checked", "max abs err", "max rel err", "worst at",
             "derived", "numeric", "")]
    for r in results:
        rows.append((r.name, "[" + ", ".join(map(str, r.shape)) + "]", str(r.checked),
                     f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", str(list(r.worst)),
                     f"{r.derived:.6g}", f"{r.numeric:.6g}", "ok" if r.ok else "WRONG"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = [f"gradients of {model}'s loss against central differences (float64, batch {BATCH}, "
             f"tolerance {ATOL:g} + {RTOL:g} x |numeric|):"]
    for row in rows:
        lines.append("  " + "  ".join(v.ljust(w) if c in (0, 1, 5) else v.rjust(w)
                                      for c, (v, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)
