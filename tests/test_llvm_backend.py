"""The llvm backend against the numpy backend, the reference: every op through tiny .nn programs
at odd batch sizes, test_ops' op cases through their IR graphs, the counter-based random numbers
and dropout masks bit for bit, every bundled model's outputs, loss and gradients, 20 optimizer
steps for every optimizer configuration, a short training run, batch-shape changes, input layouts
and run-time errors; a program's module compiled in parts at once, and its cache file."""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import replace

import numpy as np
import pytest
from backend_cases import OP_CASES, OpCase, called_ops, with_dtype
from conftest import MODELS, REPO, op_graph
from test_ops import COMPOSITE_CASES, PRIMITIVE_CASES
from test_optimizers import CASES as OPTIMIZER_CASES
from test_optimizers import PROBLEMS, optimizer_call

import graphc
from graphc.errors import GraphcError
from graphc.ir import OPS
from graphc.ir import ops as op_table
from graphc.ir.node import Graph
from graphc.ir.types import DType, TensorType
from graphc.passes import PipelineOptions, run_pipeline
from graphc.runtime import Program, load_artifact
from graphc.runtime.program import rng_key

pytest.importorskip("llvmlite", reason="the llvm backend generates its kernels with llvmlite")

# --- tolerances ---------------------------------------------------------------------------------
# An element passes when |llvm - numpy| <= atol * scale + rtol * |numpy|, scale being the largest
# finite magnitude of the expected array (at least 1): an element that cancels to near zero keeps
# the rounding of the terms it came from. Below the smallest normal number anything goes
# (flushing subnormals to zero is allowed). nan must meet nan, inf the same inf; integer and bool
# results must be equal.
#
# f32: FMA contraction and reductions or matrix products summed in another order (vector lanes,
# blocking) cost a few ulps (2**-24 ~ 6e-8) per operation, over sums of up to ~1000 terms.
F32 = {"rtol": 1e-5, "atol": 1e-6}
# f64: the same freedoms at 2**-53 ~ 1.1e-16 per operation.
F64 = {"rtol": 1e-12, "atol": 1e-13}
# f16 (if the backend runs it): one rounding of an f32 computation, eps 2**-10 ~ 1e-3.
F16 = {"rtol": 2e-3, "atol": 2e-3}
TOLERANCES = {np.dtype(np.float16): F16, np.dtype(np.float32): F32, np.dtype(np.float64): F64}
# 20 training steps: each step's rounding feeds the next, and adaptive optimizers (Adam, RMSprop,
# AdaGrad) divide by sqrt of a moment, amplifying the differences of near-zero gradients.
TRAIN_TOLERANCES = {np.dtype(np.float32): {"rtol": 1e-4, "atol": 1e-5},
                    np.dtype(np.float64): {"rtol": 1e-9, "atol": 1e-12}}

BATCHES = (1, 3, 7, 65)          # symbolic N: one row, odd sizes, one past a multiple of 64
TRAIN_STEPS = 20
STATE_CHECKS = (1, 2, 5, 10, 15, 20)


# --- comparing with the reference ---------------------------------------------------------------

def assert_close(got, want, where: str, tol: dict | None = None, dtype=None) -> None:
    """`got` (llvm) against `want` (numpy), with the tolerance of `dtype` (else of `want`) updated
    by `tol`; the message names the place, the largest errors and the worst element, so that a
    failure reads as a bug report."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{where}: shape {got.shape}, numpy gives {want.shape}"
    assert got.dtype == want.dtype, f"{where}: dtype {got.dtype}, numpy gives {want.dtype}"
    if want.dtype.kind != "f":
        bad = np.argwhere(got != want)
        if len(bad):
            i = tuple(int(k) for k in bad[0])
            raise AssertionError(f"{where}: {len(bad)} of {want.size} elements differ; first at "
                                 f"{list(i)}: got {got[i].item()!r}, numpy {want[i].item()!r}")
        return
    tol = {**TOLERANCES[np.dtype(dtype or want.dtype)], **(tol or {})}
    g, w = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(g) & np.isfinite(w)
    same_special = (np.isnan(g) & np.isnan(w)) | (np.isinf(w) & (g == w))   # nan for nan, inf for inf
    special = ~finite & ~same_special
    g_f, w_f = np.where(finite, g, 0.0), np.where(finite, w, 0.0)
    scale = max(1.0, float(np.max(np.abs(w_f), initial=0.0)))
    err = np.abs(g_f - w_f)
    allowed = tol["atol"] * scale + tol["rtol"] * np.abs(w_f) + np.finfo(want.dtype).tiny
    bad = special | (err > allowed)
    if not bad.any():
        return
    rel = err / np.where(w_f == 0, 1.0, np.abs(w_f))
    worst = tuple(int(k) for k in (np.argwhere(special)[0] if special.any() else
                                   np.unravel_index(np.argmax(err - allowed), w.shape)))
    raise AssertionError(
        f"{where}: {int(bad.sum())} of {want.size} elements out of tolerance (rtol {tol['rtol']:g}, "
        f"atol {tol['atol']:g} x {scale:.3g}); max abs err {err.max():.3g}, max rel err "
        f"{rel.max():.3g}; worst at {list(worst)}: got {got[worst].item()!r}, numpy {want[worst].item()!r}"
        + (f"; {int(special.sum())} non-finite mismatches" if special.any() else ""))


def shapes_of(feeds: dict) -> str:
    return ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in feeds.items())


def llvm_twin(ref: Program) -> Program:
    """The same graphs, parameters and metadata on the llvm backend."""
    return Program(ref.name, ref.graphs, ref.param_info, {k: v.copy() for k, v in ref.params.items()},
                   backend="llvm", meta=ref.meta, state=ref.state_info,
                   train_step=ref.train_step_contract)


def quiet():
    """numpy warns on overflow and invalid values; the cases that make them on purpose expect
    inf and nan, on both backends alike."""
    return np.errstate(all="ignore")


# --- 1. every op, through .nn programs (the cases are in backend_cases.py) --------------------

def _op_params():
    for case in OP_CASES:
        for dtype in (("f32", "f64") if case.floats else ("",)):
            yield pytest.param(case, dtype or "f32", id=f"{case.name}-{dtype}" if dtype else case.name)


def _seed(text: str) -> int:
    return zlib.crc32(text.encode())


@pytest.mark.parametrize("case, dtype", list(_op_params()))
def test_op_matches_numpy(case: OpCase, dtype: str):
    """One program per case and dtype, run at every batch size in turn (so its buffers are also
    planned again for each)."""
    source = case.source(dtype)
    ref = graphc.compile_source(source)
    fast = graphc.compile_source(source, backend="llvm")
    rng = np.random.default_rng(_seed(case.name + dtype))
    for n in BATCHES:
        feeds = case.feeds(ref, n, rng)
        kept = {k: v.copy() for k, v in feeds.items()}
        with quiet():
            want = ref.forward(**feeds)
            got = fast.forward(**feeds)
        for k, v in feeds.items():
            np.testing.assert_array_equal(v, kept[k], err_msg=f"{case.name}: llvm changed input {k}")
        for i, expr in enumerate(case.outputs):
            where = f"{case.name} [{dtype}] {with_dtype(expr, dtype)} on {shapes_of(feeds)}"
            assert_close(got[f"o{i}"], want[f"o{i}"], where, case.tol)


MATMUL_NN = """
model mm {
    input x: T[N, 1024]
    input y: T[N, 160]
    input W: T[1024, 160]
    output xw = x @ W
    output xty = transpose(x) @ y
    output ywt = y @ transpose(W)
}
"""


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_matrix_products_on_every_path(dtype):
    """Products small enough for a generated loop (N = 3), through the BLAS on one thread (N = 7)
    and on all its threads (N = 512: 84M multiply-adds), with transposed operands as the backward
    pass makes them; then a small one again, after the BLAS's threads have run."""
    source = with_dtype(MATMUL_NN, dtype)
    ref = graphc.compile_source(source)
    fast = graphc.compile_source(source, backend="llvm")
    rng = np.random.default_rng(_seed("matmul" + dtype))
    numpy_dtype = np.dtype(dtype.replace("f", "float"))
    W = (rng.standard_normal((1024, 160)) / 32).astype(numpy_dtype)
    for n in (3, 7, 512, 7):
        feeds = {"x": rng.standard_normal((n, 1024)).astype(numpy_dtype),
                 "y": rng.standard_normal((n, 160)).astype(numpy_dtype), "W": W}
        want, got = ref.forward(**feeds), fast.forward(**feeds)
        for name in want:
            assert_close(got[name], want[name], f"matmul [{dtype}] {name} on {shapes_of(feeds)}")


def test_every_op_has_a_case():
    """A new op fails here until it is compared on this backend: by name in a .nn case, or (for
    the ops .nn cannot call) in an IR test below."""
    not_callable = {"uniform"}                        # test_uniform_draws_are_bit_identical
    not_callable |= {"all_reduce"}    # no kernel runs it: test_mpi.py's split train steps
    ops = {n for n, op in OPS.items() if op.kind != "source"}
    missing = ops - called_ops() - not_callable
    assert not missing, f"ops without a case in test_llvm_backend.py: {sorted(missing)}"


# --- 2. test_ops' cases, through their IR graphs --------------------------------------------------

def _graph_program(graph: Graph, backend: str) -> Program:
    lowered = run_pipeline(graph, PipelineOptions(verify=True))
    return Program(graph.name, {"forward": lowered}, {}, {}, backend=backend)


def _ir_params():
    cases = [(c[0], c[1], c[2]) for c in PRIMITIVE_CASES] + list(COMPOSITE_CASES)
    cases += [("where", [np.array([True, False, True]), np.arange(3.0), -np.arange(3.0)], {}),
              ("concat", [np.ones((2, 3)), np.zeros((2, 5))], {"axis": 1})]
    return [pytest.param(op, arrays, attrs, id=f"{op}-{i}") for i, (op, arrays, attrs) in enumerate(cases)]


@pytest.mark.parametrize("op, arrays, attrs", _ir_params())
def test_op_graph_matches_numpy(op, arrays, attrs):
    """tests/test_ops.py's primitive and composite cases (f64, fixed shapes) as one-op programs:
    the dtype and batch variations are the .nn cases' business."""
    graph = op_graph(op, arrays, attrs)
    ref, fast = _graph_program(graph, "numpy"), _graph_program(graph, "llvm")
    # An operand the op ignores (batch norm's given statistics in training) is not an input.
    feeds = {f"a{i}": a for i, a in enumerate(arrays) if f"a{i}" in ref.inputs}
    want = ref.forward(**feeds)["out"]
    got = fast.forward(**feeds)["out"]
    assert_close(got, want, f"{op}{attrs or ''} on {shapes_of(feeds)}")


# --- 3. random numbers and dropout, bit for bit -------------------------------------------------

def _uniform_program(shape: tuple, stream: int, dtype: str, backend: str) -> Program:
    key = op_table.source("input", TensorType(DType.i64, ()), name="k")
    x = op_table.source("input", TensorType(DType.f32, ("N",)), name="x")     # binds N
    u = op_table.apply("uniform", [key], {"shape": shape, "stream": stream, "dtype": dtype})
    return _graph_program(Graph("draw", (("u", u), ("n", op_table.apply("neg", [x])))), backend)


KEYS = (0, 1, 5, rng_key(1, 3), rng_key(2**31 - 1, 10**6), 2**63 - 1, -1)


@pytest.mark.parametrize("shape, stream", [(("N", 13), 0), ((3, "N", 5), 1), ((1,), 7),
                                           ((1003,), 2), (("N", 256), 3)],
                         ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_uniform_draws_are_bit_identical(shape, stream, dtype):
    """The counter-based hash of graphc/ir/primitives.py, element for element, for keys with
    high bits, negative keys, several streams and sizes that are no multiple of a vector."""
    ref, fast = (_uniform_program(shape, stream, dtype, b) for b in ("numpy", "llvm"))
    for key in KEYS:
        for n in (1, 7, 65):
            feeds = {"k": np.int64(key), "x": np.zeros(n, np.float32)}
            want, got = ref.forward(**feeds)["u"], fast.forward(**feeds)["u"]
            assert got.dtype == want.dtype and got.shape == want.shape
            bad = [tuple(int(i) for i in b) for b in np.argwhere(got != want)]
            assert not bad, (f"uniform(shape={list(shape)}, stream={stream}, dtype={dtype}) "
                             f"key {key}, N={n}: {len(bad)} of {want.size} draws differ, first at "
                             f"{list(bad[0])}: got {got[bad[0]].item()!r}, numpy {want[bad[0]].item()!r}")


DROPOUT_NN = """
model drop {
    input x: T[N, 13]
    param w: T[7, 1001] = ones()
    param v: T[3, 5] = ones()
    output o = x * 2
    loss = mean(x) + sum(dropout(w, p=0.3)) + 2 * sum(dropout(v, 0.5))
}
train drop { optimizer = sgd(lr=0.1) }
"""


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_dropout_masks_are_bit_identical(dtype):
    """d loss / d w is the mask of the dropout site over w, scaled: the kept elements must be
    exactly numpy's, for several seeds and steps (the key) and two sites (the stream)."""
    source = with_dtype(DROPOUT_NN, dtype)
    ref = graphc.compile_source(source)
    fast = graphc.compile_source(source, backend="llvm")
    x = np.random.default_rng(0).standard_normal((7, 13))
    for seed in (0, 1, 2**31 - 1):
        ref.seed = fast.seed = seed
        for step in range(3):
            where = f"dropout [{dtype}], seed {seed}, step {step}"
            loss_want, want = ref.loss_and_grads(x=x)
            loss_got, got = fast.loss_and_grads(x=x)
            for name in ("w", "v"):
                diff = np.argwhere((got[name] != 0) != (want[name] != 0))
                assert not len(diff), (f"{where}: the mask over {name} differs at {len(diff)} of "
                                       f"{want[name].size} elements, first {[int(i) for i in diff[0]]}")
                assert_close(got[name], want[name], f"{where}: grad {name}")
            assert_close(loss_got, loss_want, f"{where}: loss", dtype=want["w"].dtype)
            ref.train_step(x=x)
            fast.train_step(x=x)
            assert fast.step == ref.step


# --- 4. the bundled models: outputs, loss and gradients ---------------------------------------

def _classes(program: Program) -> int:
    task = program.meta.get("task") or {}
    if task.get("kind") == "classification":
        return int(program.graphs["forward"].output_map[task["output"]].shape[-1])
    return 10


def model_feeds(program: Program, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of the right shapes: labels within the classifier's classes."""
    feeds = {}
    for name, t in program.train_inputs.items():
        shape = tuple(n if isinstance(d, str) else d for d in t.shape)
        if t.dtype.is_int:
            feeds[name] = rng.integers(0, _classes(program), shape).astype(t.dtype.numpy)
        else:
            feeds[name] = rng.standard_normal(shape).astype(t.dtype.numpy)
    return feeds


def random_params(programs: tuple[Program, ...], rng: np.random.Generator) -> None:
    """The same random parameters in every program (zero-initialized ones would test little)."""
    first = programs[0]
    for name, value in first.params.items():
        std = 1 / math.sqrt(value.shape[0]) if value.ndim >= 2 else 0.1
        draw = (rng.standard_normal(value.shape) * std).astype(value.dtype)
        if first.param_info[name].role == "stat":   # batch norm's running statistics: a variance
            draw = np.abs(draw) + draw.dtype.type(0.5)   # is positive (sqrt of it in evaluation)
        for p in programs:
            p.params[name] = draw.copy()


# In f64 too (tight tolerances): the course's network, the main job and the backprop example.
# Every op runs in f64 in the op cases; more models here would mostly add compile time.
F64_MODELS = ("mnist_mlp", "digits_mlp", "backprop_example")


def _model_params():
    for path in MODELS:
        for dtype in ("f32", "f64") if path.stem in F64_MODELS else ("f32",):
            yield pytest.param(path, dtype, id=f"{path.stem}-{dtype}")


def compile_pair(source: str, path: str, seed: int | None = None) -> tuple[Program, Program]:
    ref = graphc.compile_source(source, path=path, seed=seed)
    fast = graphc.compile_source(source, backend="llvm", path=path, seed=seed)
    return ref, fast


def assert_same_params(fast: Program, ref: Program, where: str, tol: dict | None = None) -> None:
    assert set(fast.params) == set(ref.params), where
    for name in ref.params:
        assert_close(fast.params[name], ref.params[name], f"{where}: param {name}", tol)


def assert_same_state(fast: Program, ref: Program, where: str, tol: dict | None = None) -> None:
    assert set(fast.state) == set(ref.state), f"{where}: state slots"
    for name in ref.state:
        assert_close(fast.state[name], ref.state[name], f"{where}: state {name}", tol)


@pytest.mark.parametrize("path, dtype", list(_model_params()))
def test_model_matches_numpy(path, dtype):
    """forward, evaluate and loss_and_grads (dropout on, keyed by the step) of every models/*.nn
    file, in f32 as written (and some in f64), for random parameters and inputs; data sets are
    never loaded, so files that train on MNIST compile and run here too."""
    source = path.read_text().replace("f32", dtype)
    ref, fast = compile_pair(source, str(path.relative_to(REPO)))
    rng = np.random.default_rng(_seed(path.stem + dtype))
    random_params((ref, fast), rng)
    start = {k: v.copy() for k, v in fast.params.items()}
    for n in (7, 1, 65):
        batch = model_feeds(ref, n, rng)
        where = f"{path.name} [{dtype}] on {shapes_of(batch)}"
        features = {k: v for k, v in batch.items() if k in ref.inputs}
        want, got = ref.forward(**features), fast.forward(**features)
        assert list(got) == list(want), where
        for name in want:
            assert_close(got[name], want[name], f"{where}: forward {name}")
        if "evaluate" not in ref.graphs:
            continue
        want_s, got_s = ref.evaluate(**batch), fast.evaluate(**batch)
        assert set(got_s) == set(want_s), where
        assert_close(got_s["loss"], want_s["loss"], f"{where}: evaluate loss", dtype=dtype_of(ref))
        if "accuracy" in want_s:     # an argmax may flip on a near-tie: one sample at most
            assert abs(got_s["accuracy"] - want_s["accuracy"]) <= 1 / n + 1e-12, where
        loss_want, grads_want = ref.loss_and_grads(**batch)
        loss_got, grads_got = fast.loss_and_grads(**batch)
        assert_close(loss_got, loss_want, f"{where}: training loss", dtype=dtype_of(ref))
        assert set(grads_got) == set(grads_want), where
        for name in grads_want:
            assert_close(grads_got[name], grads_want[name], f"{where}: grad {name}")
    for name, value in start.items():          # nothing but train_step moves the parameters
        np.testing.assert_array_equal(fast.params[name], value, err_msg=f"{path.name}: {name}")


def dtype_of(program: Program) -> np.dtype:
    return next(iter(program.params.values())).dtype


# --- 5. optimizer steps ---------------------------------------------------------------------------

def train_side_by_side(ref: Program, fast: Program, batches, where: str) -> None:
    """TRAIN_STEPS steps on both from identical parameters, the learning rate halved half-way
    (a schedule's change must reach the next step); the loss and every parameter after each step,
    the optimizer state after STATE_CHECKS."""
    tol = TRAIN_TOLERANCES[dtype_of(ref)]
    for t, batch in enumerate(batches, start=1):
        if t == TRAIN_STEPS // 2 + 1:
            ref.lr = fast.lr = ref.lr * 0.5
        at = f"{where}, step {t} on {shapes_of(batch)}"
        loss_want = ref.train_step(**batch)
        loss_got = fast.train_step(**batch)
        assert isinstance(loss_got, float), at
        assert_close(loss_got, loss_want, f"{at}: loss", tol, dtype=dtype_of(ref))
        assert fast.step == ref.step == t, at
        assert_same_params(fast, ref, at, tol)
        if t in STATE_CHECKS:
            assert_same_state(fast, ref, at, tol)


def _problem_batches(problem, seed: int):
    rng = np.random.default_rng(seed)
    x, labels = problem.data(rng)
    for t in range(TRAIN_STEPS):
        index = rng.choice(len(x), (16, 16, 7)[t % 3], replace=False)
        yield {"x": x[index], problem.label: labels[index]}


@pytest.mark.parametrize("name, options", [pytest.param(n, o, id=optimizer_call(n, o))
                                           for n, o in OPTIMIZER_CASES])
def test_optimizer_steps_match_numpy(name, options):
    """Every optimizer configuration of tests/test_optimizers.py (sgd with momentum, dampening,
    nesterov and weight decay; adagrad; rmsprop, centered and with momentum; adam, amsgrad; adamw)
    on its softmax regression (a weight and a bias: decay reaches one of them), in f64."""
    problem = PROBLEMS["softmax"]
    source = problem.source.replace("OPTIMIZER", optimizer_call(name, options))
    ref, fast = compile_pair(source, "<string>", seed=11)
    assert_same_params(fast, ref, "initialization", {"rtol": 0.0, "atol": 0.0})
    train_side_by_side(ref, fast, _problem_batches(problem, 11), optimizer_call(name, options))


# The CNNs train with Adam, whose step m / sqrt(v) has the size of lr whatever the gradient: over
# a million weights, a few near-zero gradients flip sign between two correct float32 summation
# orders. tests/test_conv.py compares llvm with numpy on a CNN with batch norm under SGD instead.
TRAINABLE = [m for m in MODELS if re.search(r"^train\s+\w+", m.read_text(), re.M)
             and "conv(" not in m.read_text()]


@pytest.mark.parametrize("path", TRAINABLE, ids=[m.stem for m in TRAINABLE])
def test_model_train_steps_match_numpy(path):
    """The train blocks of models/ in f32 as written (sgd with weight decay, nesterov, adagrad,
    rmsprop, adam, adamw; dropout in two of them), batches of 16, 16 and 7."""
    ref, fast = compile_pair(path.read_text(), str(path.relative_to(REPO)))
    rng = np.random.default_rng(_seed(path.stem))
    random_params((ref, fast), rng)
    batches = (model_feeds(ref, (16, 16, 7)[t % 3], rng) for t in range(TRAIN_STEPS))
    train_side_by_side(ref, fast, batches, f"{path.name} ({ref.optimizer})")


def test_scalar_parameter_and_roles_train_alike():
    """A 0-d parameter with role `other`, a bias declared `as weight` (so weight decay reaches
    it) and AdamW's decoupled decay."""
    source = """
model wd {
    input x: f64[N, 4]
    input t: f64[N, 2]
    param W: f64[4, 2] = normal()
    param b: f64[2]    = normal() as weight
    param s: f64[]     = constant(1.5)
    output f = (x @ W + b) * s
    loss = mse(f, t)
}
train wd { optimizer = adamw(lr=0.01, weight_decay=0.2) }
"""
    ref, fast = compile_pair(source, "<string>", seed=6)
    rng = np.random.default_rng(6)
    batches = ({"x": rng.standard_normal((n, 4)), "t": rng.standard_normal((n, 2))}
               for n in (8, 3, 8, 1) * (TRAIN_STEPS // 4))
    train_side_by_side(ref, fast, batches, "scalar parameter")
    assert fast.params["s"].shape == ()


# --- 6. a short training run ----------------------------------------------------------------------

def _compare_runs(fast: tuple[list, dict], ref: tuple[list, dict], where: str, sizes: dict) -> None:
    """Epoch rows and final scores of two runs; accuracies to one sample of their split."""
    tol = TRAIN_TOLERANCES[np.dtype(np.float32)]
    (history, scores), (ref_history, ref_scores) = fast, ref
    assert [r["epoch"] for r in history] == [r["epoch"] for r in ref_history], where
    for row, want in zip(history, ref_history):
        at = f"{where}, epoch {want['epoch']}"
        assert row["lr"] == pytest.approx(want["lr"], rel=1e-12), at
        for key in ("loss", "val_loss"):
            assert_close(row[key], want[key], f"{at}: {key}", tol, dtype=np.float32)
        assert abs(row["val_accuracy"] - want["val_accuracy"]) <= 1 / sizes["val"] + 1e-12, at
    for split in ("val", "test"):
        assert_close(scores[split]["loss"], ref_scores[split]["loss"], f"{where}: {split} loss",
                     tol, dtype=np.float32)
        assert abs(scores[split]["accuracy"] - ref_scores[split]["accuracy"]) \
            <= 1 / sizes[split] + 1e-12, f"{where}: {split} accuracy"


def test_short_training_run_matches_numpy():
    """The main job (digits_mlp: Adam, dropout, cosine schedule) for two epochs through the
    Trainer, on the same data: epoch losses, validation scores, test scores and parameters."""
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
    from graphc.runtime.train import Trainer, TrainSettings, prepare_data
    path = REPO / "models/digits_mlp.nn"
    runs, data = {}, None
    for backend in ("numpy", "llvm"):
        p = graphc.compile_file(path, backend=backend)
        settings = replace(TrainSettings.of(p), epochs=2)
        data = data or prepare_data(p, settings, base_dir=path.parent)
        trainer = Trainer(p, settings, data)
        scores = trainer.fit()
        runs[backend] = (trainer.loop.history, scores, p)
    sizes = {k: len(y) for k, (_, y) in data.splits.items()}
    _compare_runs(runs["llvm"][:2], runs["numpy"][:2], "digits_mlp, 2 epochs", sizes)
    assert_same_params(runs["llvm"][2], runs["numpy"][2], "digits_mlp after 2 epochs",
                       TRAIN_TOLERANCES[np.dtype(np.float32)])


def _train_cli_has_backend(capsys) -> bool:
    from graphc.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return "--backend" in capsys.readouterr().out


def test_graphc_train_backend_llvm_matches_numpy(tmp_path, capsys):
    """`graphc train --backend llvm` against `graphc train`, two epochs of digits_logreg."""
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
    if not _train_cli_has_backend(capsys):
        pytest.skip("`graphc train` has no --backend option yet")
    import csv
    import json

    from graphc.cli import main
    path = REPO / "models/digits_logreg.nn"
    runs = {}
    for backend in ("numpy", "llvm"):
        out = tmp_path / backend
        code = main(["train", str(path), "--out", str(out), "--epochs", "2", "--quiet",
                     "--backend", backend])
        assert code == 0, capsys.readouterr().err
        with open(out / "metrics.csv", newline="") as f:
            history = [{k: float(v) if k != "epoch" else int(v) for k, v in row.items() if v}
                       for row in csv.DictReader(f)]
        scores = json.loads((out / "scores.json").read_text())
        runs[backend] = (history, scores)
        config = json.loads((out / "config.json").read_text())
    sizes = config["data"]["sizes"]
    _compare_runs(runs["llvm"], runs["numpy"], "graphc train digits_logreg", sizes)


# --- 7. batch shapes, input layouts, returned buffers ------------------------------------------

def test_batch_shape_changes():
    """Buffers are planned per batch shape: 64, 7, 64 again (the same data: the same results, bit
    for bit), 1 and 65, through every method; results handed out earlier stay as they were."""
    path = REPO / "models/digits_mlp.nn"
    ref, fast = compile_pair(path.read_text(), "models/digits_mlp.nn")
    rng = np.random.default_rng(64)
    random_params((ref, fast), rng)
    first = model_feeds(ref, 64, rng)
    sequence = [first, model_feeds(ref, 7, rng), first, model_feeds(ref, 1, rng),
                model_feeds(ref, 65, rng)]
    seen = []
    for i, batch in enumerate(sequence):
        where = f"call {i + 1}, {shapes_of(batch)}"
        got = fast.forward(x=batch["x"])
        assert_close(got["probs"], ref.forward(x=batch["x"])["probs"], f"{where}: forward")
        scores = fast.evaluate(**batch)
        assert_close(scores["loss"], ref.evaluate(**batch)["loss"], f"{where}: evaluate",
                     dtype=np.float32)
        loss, grads = fast.loss_and_grads(**batch)
        loss_want, grads_want = ref.loss_and_grads(**batch)
        assert_close(loss, loss_want, f"{where}: loss", dtype=np.float32)
        for name in grads_want:
            assert_close(grads[name], grads_want[name], f"{where}: grad {name}")
        seen.append((got["probs"].copy(), got, {k: g.copy() for k, g in grads.items()}, grads))
    np.testing.assert_array_equal(seen[2][0], seen[0][0], err_msg="forward at 64, again")
    for name in seen[0][2]:
        np.testing.assert_array_equal(seen[2][2][name], seen[0][2][name],
                                      err_msg=f"grad {name} at 64, again")
    for i, (probs, out, grads_copy, grads) in enumerate(seen):
        np.testing.assert_array_equal(out["probs"], probs,
                                      err_msg=f"forward result of call {i + 1} changed later")
        for name, g in grads.items():
            np.testing.assert_array_equal(g, grads_copy[name],
                                          err_msg=f"grad {name} of call {i + 1} changed later")
    for t, batch in enumerate(sequence, start=1):
        at = f"train step {t}, {shapes_of(batch)}"
        assert_close(fast.train_step(**batch), ref.train_step(**batch), at, dtype=np.float32)
        assert_same_params(fast, ref, at, TRAIN_TOLERANCES[np.dtype(np.float32)])


def test_parameters_and_state_replaced_between_steps(tmp_path):
    """What early stopping, resuming and user code do between steps: assign parameters, replace
    the state, reset it, load a checkpoint. The next step must use the new values."""
    from graphc.runtime.checkpoint import load_checkpoint, save_checkpoint
    path = REPO / "models/digits_mlp.nn"
    ref, fast = compile_pair(path.read_text(), "models/digits_mlp.nn")
    rng = np.random.default_rng(12)
    random_params((ref, fast), rng)
    batches = [model_feeds(ref, 16, rng) for _ in range(4)]
    tol = TRAIN_TOLERANCES[np.dtype(np.float32)]

    def steps(where: str, count: int = 2) -> None:
        for i in range(count):
            batch = batches[i % len(batches)]
            assert_close(fast.train_step(**batch), ref.train_step(**batch), f"{where}: loss",
                         tol, dtype=np.float32)
        assert fast.step == ref.step, where
        assert_same_params(fast, ref, where, tol)
        assert_same_state(fast, ref, where, tol)

    steps("first steps")
    save_checkpoint(tmp_path / "ckpt.npz", ref, {})
    params = {k: v.copy() for k, v in ref.params.items()}
    state = {k: v.copy() for k, v in ref.state.items()}
    steps("more steps")
    for p in (ref, fast):                        # parameters and state put back by hand
        for k, v in params.items():
            p.params[k] = v
        p.state = {k: v.copy() for k, v in state.items()}
    steps("after assigning parameters and state")
    for p in (ref, fast):
        p.reset_state()
    steps("after reset_state")
    for p in (ref, fast):
        load_checkpoint(tmp_path / "ckpt.npz", p)
    steps("after load_checkpoint")
    x = batches[0]["x"]
    for p in (ref, fast):
        p.params["logits.linear_2.b"] = np.full(10, 0.5, np.float32)
    assert_close(fast.forward(x=x)["probs"], ref.forward(x=x)["probs"], "forward after assigning")


def test_inputs_of_any_layout():
    """Fortran order, strided and reversed views, and labels of another integer dtype are read as
    numpy reads them."""
    path = REPO / "models/digits_mlp.nn"
    ref, fast = compile_pair(path.read_text(), "models/digits_mlp.nn")
    rng = np.random.default_rng(5)
    wide = rng.standard_normal((9, 128)).astype(np.float32)
    labels = rng.integers(0, 10, 18)
    layouts = {"fortran": (np.asfortranarray(wide[:, :64]), labels[:9]),
               "strided": (wide[:, ::2], labels[::2]),
               "reversed": (wide[::-1, 64:], labels[9:][::-1]),
               "int32 labels": (np.ascontiguousarray(wide[:, 1:65]), labels[:9].astype(np.int32))}
    for name, (x, y) in layouts.items():
        assert_close(fast.forward(x=x)["probs"], ref.forward(x=x)["probs"], f"{name}: forward")
        assert_close(fast.evaluate(x=x, y=y)["loss"], ref.evaluate(x=x, y=y)["loss"],
                     f"{name}: evaluate", dtype=np.float32)
        _, got = fast.loss_and_grads(x=x, y=y)
        _, want = ref.loss_and_grads(x=x, y=y)
        for k in want:
            assert_close(got[k], want[k], f"{name}: grad {k}")


# --- 8. run-time errors ----------------------------------------------------------------------------

ONE_HOT_NN = "model t {\n    input y: i64[N]\n    output o = one_hot(y, 10)\n}\n"


def _raised(call) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: B017 (the type is compared with numpy's below)
        call()
    return info.value


@pytest.mark.parametrize("label", [10, -1, 1 << 40])
def test_out_of_range_label_raises_numpys_error(label):
    """one_hot in forward, and nll through evaluate, loss_and_grads and train_step: the same
    exception type and message (location included); a failed train step changes nothing."""
    ref_o, fast_o = compile_pair(ONE_HOT_NN, "onehot.nn")
    y = np.array([1, label, 2])
    want, got = _raised(lambda: ref_o.forward(y=y)), _raised(lambda: fast_o.forward(y=y))
    assert type(got) is type(want) and str(got) == str(want), f"forward: {got!r} != {want!r}"
    assert isinstance(want, GraphcError)

    path = REPO / "models/digits_mlp.nn"
    ref, fast = compile_pair(path.read_text(), "models/digits_mlp.nn")
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    before = {k: v.copy() for k, v in fast.params.items()}
    for method in ("evaluate", "loss_and_grads", "train_step"):
        want = _raised(lambda m=method: getattr(ref, m)(x=x, y=y))
        got = _raised(lambda m=method: getattr(fast, m)(x=x, y=y))
        assert type(got) is type(want), f"{method}: {type(got).__name__} != {type(want).__name__}"
        assert str(got) == str(want), f"{method}:\n  llvm:  {got}\n  numpy: {want}"
    assert fast.step == ref.step == 0
    assert all(np.array_equal(fast.params[k], v) for k, v in before.items())
    good = np.array([1, 9, 2])               # and the program still works afterwards
    assert_close(fast.train_step(x=x, y=good), ref.train_step(x=x, y=good), "step after error",
                 dtype=np.float32)
    assert_same_params(fast, ref, "after the error", TRAIN_TOLERANCES[np.dtype(np.float32)])


# --- 9. the program around the backend -------------------------------------------------------------

def test_program_on_llvm_looks_like_numpys():
    path = REPO / "models/mnist_mlp.nn"
    ref = graphc.compile_file(path)
    fast = graphc.compile_file(path, backend="llvm")
    assert fast.backend == "llvm" and "on llvm" in repr(fast)
    assert fast.inputs == ref.inputs and fast.outputs == ref.outputs
    assert fast.train_inputs == ref.train_inputs
    assert (fast.lr, fast.step, fast.seed, fast.optimizer) == (ref.lr, ref.step, ref.seed, ref.optimizer)
    for name, value in ref.params.items():       # the same initialization
        np.testing.assert_array_equal(fast.params[name], value, err_msg=name)
        assert fast.params[name].dtype == value.dtype
    assert {k: (v.dtype, v.shape) for k, v in fast.state.items()} == \
        {k: (v.dtype, v.shape) for k, v in ref.state.items()}


def test_llvm_twin_and_loaded_artifact_match_numpy(tmp_path):
    """Program(..., backend="llvm") over numpy's graphs, and an artifact loaded for llvm: a
    forward pass and a train step each."""
    path = REPO / "models/digits_adamw.nn"
    ref = graphc.compile_file(path)
    ref.save(tmp_path / "artifact")
    batch = model_feeds(ref, 9, np.random.default_rng(9))
    pairs = {"twin": (llvm_twin(ref), ref),
             "artifact": (load_artifact(tmp_path / "artifact", backend="llvm"),
                          load_artifact(tmp_path / "artifact"))}
    for what, (fast, numpy_side) in pairs.items():
        assert fast.backend == "llvm"
        assert_close(fast.forward(x=batch["x"])["probs"], numpy_side.forward(x=batch["x"])["probs"],
                     f"{what}: forward")
        assert_close(fast.train_step(**batch), numpy_side.train_step(**batch), f"{what}: train step",
                     dtype=np.float32)
        assert_same_params(fast, numpy_side, f"{what}: after a step", TRAIN_TOLERANCES[np.dtype(np.float32)])


def test_f16_if_the_backend_runs_it():
    source = ("model h {\n    input a: f16[N, 13]\n    input b: f16[13]\n"
              "    output o = relu(a * b + 1) - exp(a * 0.5)\n    output s = sum(a, axis=1)\n}\n")
    ref = graphc.compile_source(source)
    try:
        fast = graphc.compile_source(source, backend="llvm")
        rng = np.random.default_rng(16)
        feeds = {"a": rng.standard_normal((7, 13)).astype(np.float16),
                 "b": rng.standard_normal(13).astype(np.float16)}
        got = fast.forward(**feeds)
    except GraphcError as err:
        if "f16" not in str(err):
            raise
        pytest.skip(f"the llvm backend refuses f16: {err}")
    want = ref.forward(**feeds)
    for name in want:
        assert_close(got[name], want[name], f"f16 {name}")


# --- 7. compiling a program's module in parts, at once -----------------------------------------

def _train_twice(ref: Program, batch: dict) -> tuple[dict, float, dict]:
    """Forward, one train step, and the parameters after it, on a fresh llvm twin."""
    fast = llvm_twin(ref)
    forward = fast.forward(x=batch["x"])
    loss = fast.train_step(**batch)
    return forward, loss, {k: v.copy() for k, v in fast.params.items()}


def test_module_compiled_in_parallel_parts_runs_like_one(tmp_path, monkeypatch):
    """A module split into parts compiled in threads (kernels called across parts) computes what
    the module in one part does, bit for bit; its parts are cached in one file that a second
    program reads without compiling."""
    from graphc.backends.llvm import executor, jit
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "one"))
    ref = graphc.compile_file(REPO / "models/digits_adamw.nn")
    batch = model_feeds(ref, 9, np.random.default_rng(4))
    monkeypatch.setattr(jit, "compile_threads", lambda: 1)
    whole = _train_twice(ref, batch)

    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "parts"))
    monkeypatch.setattr(jit, "compile_threads", lambda: 3)
    monkeypatch.setattr(executor, "MIN_FUNCTIONS_PER_PART", 2)
    compiled = []
    real_compile = jit.compile_ir
    monkeypatch.setattr(jit, "compile_ir", lambda text: compiled.append(text) or real_compile(text))
    parts = _train_twice(ref, batch)
    assert len(compiled) == 3 and all("define internal" not in text for text in compiled)
    for name, value in whole[0].items():
        np.testing.assert_array_equal(parts[0][name], value, err_msg=name)
    assert parts[1] == whole[1]
    for name, value in whole[2].items():
        np.testing.assert_array_equal(parts[2][name], value, err_msg=name)

    cached = list((tmp_path / "parts" / "llvm").iterdir())
    assert len(cached) == 1 and len(jit._unpack(cached[0].read_bytes())) == 3
    monkeypatch.setattr(jit, "compile_ir", lambda text: pytest.fail("compiled despite the cache"))
    again = _train_twice(ref, batch)
    for name, value in parts[2].items():
        np.testing.assert_array_equal(again[2][name], value, err_msg=name)


def test_a_damaged_cache_file_is_compiled_again(tmp_path, monkeypatch):
    import ctypes

    from graphc.backends.llvm import jit
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    ir = "define i32 @seven() {\nentry:\n  ret i32 7\n}\n"
    first = jit.object_code("seven", lambda: ir)
    path = tmp_path / jit.object_name("seven")
    path.write_bytes(path.read_bytes()[:-5])          # cut short, as by a full disk
    assert jit.object_code("seven", lambda: ir) == first
    assert jit._unpack(path.read_bytes()) == [first]
    compiled = jit.Compiled(first)                    # alive while its code runs
    assert ctypes.CFUNCTYPE(ctypes.c_int32)(compiled.address("seven"))() == 7


def test_compiling_goes_around_llvmlites_lock():
    """The pass pipeline and the code generator are called outside llvmlite's process-wide lock
    (else the parts would be compiled one after another): this llvmlite still wraps its ctypes
    functions the way jit._unlocked expects."""
    import ctypes

    from graphc.backends.llvm import jit
    ffi = jit._llvm().ffi
    for name in ("LLVMPY_RunNewModulePassManager", "LLVMPY_TargetMachineEmitToMemory"):
        wrapped = getattr(ffi.lib, name)
        assert isinstance(jit._unlocked(wrapped), ctypes._CFuncPtr) and jit._unlocked(wrapped) is not wrapped


def test_f32_exp_is_within_one_ulp_and_exact_at_the_edges():
    """llvm's f32 exp is a vectorizable polynomial (lowering._exp), not the C library's expf:
    against exp rounded from float64 it is within 1 ulp over every binade it returns, the
    subnormals within one step of the smallest, and 0, inf and NaN where they belong."""
    program = graphc.compile_source("model m { input x: f32[N]\n output y = exp(x) }", backend="llvm")
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, 1e-30, -1e-30, 88.72, 88.7228, 88.73, 89.0, 200.0, -87.3, -103.2, -103.9,
             -104.5, -200.0, np.inf, -np.inf, np.nan]
    x = np.concatenate([rng.uniform(-110, 95, 200_000), rng.uniform(-1, 1, 100_000),
                        edges]).astype(np.float32)
    got = program.forward(x=x)["y"]
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64)).astype(np.float32)
    normal = np.isfinite(want) & (want >= np.finfo(np.float32).tiny)
    ulps = np.abs(got[normal].view(np.int32).astype(np.int64) - want[normal].view(np.int32))
    assert ulps.max() <= 1, x[normal][np.argmax(ulps)]
    small = np.isfinite(want) & ~normal
    assert np.abs(got[small] - want[small]).max() <= np.finfo(np.float32).smallest_subnormal
    np.testing.assert_array_equal(got[-len(edges):], want[-len(edges):])   # 1, inf, 0, NaN
