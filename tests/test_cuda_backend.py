"""The cuda backend on a GPU against the numpy backend: every op case, every bundled model's
graphs and a few training steps, the label check, and checkpoints moving between backends.
Skipped, with the reason, where pycuda, the driver or a GPU is missing (CI has none; the kernels
are checked there by tests/test_cuda_codegen.py and tests/test_cuda_emulated.py)."""
from __future__ import annotations

import numpy as np
import pytest
from backend_cases import OP_CASES
from test_llvm_backend import TRAIN_TOLERANCES, assert_close

import graphc
from graphc.errors import GraphcError


def _gpu_or_skip() -> None:
    pytest.importorskip("pycuda", reason="the cuda backend runs through pycuda (pip install '.[cuda]')")
    from graphc.runtime.cuda.executor import CudaUnavailable, _driver
    try:
        _driver()
    except CudaUnavailable as exc:
        pytest.skip(str(exc).splitlines()[0])


@pytest.fixture(autouse=True, scope="module")
def gpu():
    _gpu_or_skip()


MODELS = ["models/backprop_example.nn", "models/digits_mlp.nn", "models/digits_adamw.nn",
          "models/digits_nesterov.nn", "models/digits_rmsprop.nn", "models/digits_adagrad.nn",
          "models/digits_logreg.nn", "models/mnist_mlp.nn"]


@pytest.mark.parametrize("case", OP_CASES, ids=[c.name for c in OP_CASES])
def test_every_op_case_matches_numpy(case):
    rng = np.random.default_rng(0)
    for dtype in (("f32", "f64") if case.floats else ("f32",)):
        ref = graphc.compile_source(case.source(dtype))
        fast = graphc.compile_source(case.source(dtype), backend="cuda")
        for n in (1, 7, 65):
            feeds = case.feeds(ref, n, rng)
            want, got = ref.forward(**feeds), fast.forward(**feeds)
            for name in want:
                assert_close(got[name], want[name], f"{case.name} {dtype} {name} N={n}", case.tol)


def _batch(program, n, rng):
    out = {}
    for name, ttype in program.train_inputs.items():
        shape = [n if isinstance(d, str) else d for d in ttype.shape]
        if ttype.dtype.is_int:
            classes = program.graphs["forward"].output_map[program.outputs[0]].shape[-1]
            out[name] = rng.integers(0, classes, shape)
        else:
            out[name] = rng.standard_normal(shape).astype(ttype.dtype.numpy)
    return out


@pytest.mark.parametrize("path", MODELS)
def test_models_train_like_numpy(path):
    ref, fast = graphc.compile_file(path), graphc.compile_file(path, backend="cuda")
    rng = np.random.default_rng(1)
    tol = {**TRAIN_TOLERANCES[np.dtype(np.float32)], "atol": max(1e-5, 0.03 * ref.lr)}
    for step in range(5):
        batch = _batch(ref, 16 + step, rng)
        assert_close(fast.loss_and_grads(**batch)[0], ref.loss_and_grads(**batch)[0], f"{path} loss")
        assert_close(fast.train_step(**batch), ref.train_step(**batch), f"{path} step {step}", tol)
        for name in ref.params:           # reading the parameters brings the device's values back
            assert_close(fast.params[name], ref.params[name], f"{path} {name} step {step}", tol)
    assert fast.step == ref.step == 5


def test_a_label_out_of_range_stops_the_step_before_any_update():
    program = graphc.compile_file("models/digits_mlp.nn", backend="cuda")
    rng = np.random.default_rng(2)
    batch = _batch(program, 8, rng)
    before = {k: v.copy() for k, v in program.params.items()}
    batch["y"][3] = 10
    with pytest.raises(GraphcError, match=r"class label 10 is out of range \[0, 10\)"):
        program.train_step(**batch)
    for name, value in program.params.items():
        np.testing.assert_array_equal(value, before[name])


def test_checkpoints_move_between_backends(tmp_path):
    from graphc.runtime.checkpoint import load_checkpoint, save_checkpoint
    rng = np.random.default_rng(3)
    gpu = graphc.compile_file("models/digits_mlp.nn", backend="cuda")
    cpu = graphc.compile_file("models/digits_mlp.nn")
    for _ in range(3):
        gpu.train_step(**_batch(gpu, 16, rng))
    save_checkpoint(tmp_path / "c.npz", gpu, {})
    load_checkpoint(tmp_path / "c.npz", cpu)
    batch = _batch(cpu, 16, rng)
    assert_close(gpu.evaluate(**batch)["loss"], cpu.evaluate(**batch)["loss"], "after the move")
