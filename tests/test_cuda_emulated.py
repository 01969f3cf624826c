"""What the generated CUDA kernels compute, checked without a GPU: the .cu of every op case and of
the bundled models runs on the CPU through tests/cuda_emulator.py (a block's threads as fibers,
barriers and warp shuffles emulated) and is compared with the numpy backend, the reference, to the
llvm backend's tolerances. A GPU run (tests/test_cuda_backend.py) checks the same on hardware."""
from __future__ import annotations

import numpy as np
import pytest
from backend_cases import OP_CASES, train_batch
from cuda_emulator import CXX, Emulated
from test_llvm_backend import TRAIN_TOLERANCES, assert_close

import graphc
from graphc.backends.kernels import plan_kernels
from graphc.ir.contract import LR_INPUT, RNG_INPUT, rng_key

pytestmark = pytest.mark.skipif(CXX is None, reason="the CUDA emulator compiles with g++")

MODELS = ["models/backprop_example.nn", "models/digits_mlp.nn", "models/digits_adamw.nn",
          "models/digits_nesterov.nn", "models/digits_rmsprop.nn", "models/digits_adagrad.nn",
          "models/digits_logreg.nn", "bench/models/mnist_mlp.nn"]


@pytest.fixture(scope="module")
def op_cases():
    """Every op case, f32 and f64, as one emulated module (one compile)."""
    programs, plans = {}, {}
    for case in OP_CASES:
        for dtype in (("f32", "f64") if case.floats else ("f32",)):
            key = f"{case.name}_{dtype}".replace("-", "_")
            program = graphc.compile_source(case.source(dtype))
            programs[key] = (case, program)
            plans[key] = plan_kernels(program.graphs["forward"])
    return programs, Emulated(plans)


# The op cases feed NaN, infinities, huge and tiny values on purpose (tests/backend_cases.py): the
# numpy side's warnings about them are expected.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n", [7, 33])
def test_every_op_case_computes_what_numpy_does(op_cases, n):
    programs, emulated = op_cases
    rng = np.random.default_rng(n)
    for key, (case, program) in programs.items():
        feeds = case.feeds(program, n, rng)
        want = program.forward(**feeds)
        got = emulated.run(key, feeds, {}, {}, {"N": n})
        for name in want:
            assert_close(got[name], want[name], f"{key} {name} at N={n}", case.tol)


def _feeds(program, batch: dict, step: int) -> dict:
    lr_dtype = program._lr_dtype
    return {**batch, LR_INPUT: np.asarray(program.lr, dtype=lr_dtype),
            RNG_INPUT: np.int64(rng_key(program.seed, step))}



@pytest.mark.parametrize("path", MODELS)
def test_models_graphs_and_a_training_step_compute_what_numpy_does(path):
    program = graphc.compile_file(path)
    emulated = Emulated.of(program)
    rng = np.random.default_rng(3)
    n = 9
    batch = train_batch(program, n, rng)
    params = program.params._values
    for key in program.graphs:
        feeds = _feeds(program, batch, step=0) if key != "forward" else {
            k: batch[k] for k in program.inputs}
        ref_params = {k: v.copy() for k, v in params.items()}
        ref_state = {k: v.copy() for k, v in program.state.items()}
        want = program._executors[key].run(feeds, ref_params, {"N": n}, ref_state)
        emu_params = {k: v.copy() for k, v in params.items()}
        emu_state = {k: v.copy() for k, v in program.state.items()}
        got = emulated.run(key, feeds, emu_params, emu_state, {"N": n})
        tol = None
        if key == "train_step":
            # Adam normalizes each gradient by its own size: where a gradient cancels to about
            # eps, summation-order noise in it (checked tightly in loss_and_grads) moves that
            # element's step by a few percent of one step of size lr.
            tol = {**TRAIN_TOLERANCES[np.dtype(np.float32)], "atol": max(1e-5, 0.03 * program.lr)}
        for name, value in want.items():
            if name in got:
                actual = got[name]
            else:                                   # written in place into params or state
                target = name.removeprefix("new ")
                actual = emu_params[target] if target in emu_params else emu_state[target]
            assert_close(actual, value, f"{path} {key} {name}", tol)
