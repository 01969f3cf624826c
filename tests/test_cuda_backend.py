"""The cuda backend's executor against the numpy backend: every bundled model's graphs and
training steps, queued steps, the label check, checkpoints moving between backends, and
`graphc train --backend cuda`. On a GPU where pycuda finds one; elsewhere on the emulated pycuda
(tests/emulated_pycuda: the same executor, kernels on the CPU, queued work run as late as the host
allows), except the op cases, which need a GPU here (tests/test_cuda_emulated.py runs them through
the emulator in one module)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from backend_cases import OP_CASES, train_batch
from emulated_device import emulated_env, emulated_pycuda, gpu_problem
from test_llvm_backend import TRAIN_TOLERANCES, assert_close

import graphc
from graphc.backends.cuda.executor import SLOTS
from graphc.errors import GraphcError
from graphc.runtime.train import Trainer, TrainSettings, prepare_data

GPU_PROBLEM = gpu_problem()
on_gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"needs a GPU: {GPU_PROBLEM}")
emulated_only = pytest.mark.skipif(GPU_PROBLEM is None,
                                   reason="counts the emulated driver's waits (a GPU is in use)")


@pytest.fixture(autouse=True, scope="module")
def device():
    """The real driver where a GPU is, else the emulated one, for the whole module."""
    if GPU_PROBLEM is None:
        import pycuda.driver as drv
        yield drv
    else:
        with emulated_pycuda() as drv:
            yield drv


MODELS = ["models/backprop_example.nn", "models/digits_mlp.nn", "models/digits_adamw.nn",
          "models/digits_nesterov.nn", "models/digits_rmsprop.nn", "models/digits_adagrad.nn",
          "models/digits_logreg.nn", "models/mnist_mlp.nn"]
F32 = TRAIN_TOLERANCES[np.dtype(np.float32)]


@on_gpu
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



def _assert_params_close(fast, ref, where: str, tol=F32) -> None:
    for name in ref.params:           # reading the parameters brings the device's values back
        assert_close(fast.params[name], ref.params[name], f"{where}: {name}", tol)


@pytest.mark.parametrize("path", MODELS)
def test_models_train_like_numpy(path):
    ref, fast = graphc.compile_file(path), graphc.compile_file(path, backend="cuda")
    rng = np.random.default_rng(1)
    tol = {**F32, "atol": max(1e-5, 0.03 * ref.lr)}
    trains = "train_step" in ref.graphs        # (backprop_example has no train block)
    for step in range(5 if trains else 1):
        batch = train_batch(ref, 16 + step, rng)
        (loss, grads), (want, want_grads) = fast.loss_and_grads(**batch), ref.loss_and_grads(**batch)
        assert_close(loss, want, f"{path} loss", F32)
        for name in want_grads:
            assert_close(grads[name], want_grads[name], f"{path} gradient of {name}", F32)
        if trains:
            assert_close(fast.train_step(**batch), ref.train_step(**batch), f"{path} step {step}", tol)
            _assert_params_close(fast, ref, f"{path} step {step}", tol)
    assert fast.step == ref.step == (5 if trains else 0)
    batch = {k: v for k, v in train_batch(ref, 9, rng).items() if k in ref.inputs}
    for name, want in ref.forward(**batch).items():
        assert_close(fast.forward(**batch)[name], want, f"{path} forward {name}")


def test_queued_steps_read_their_own_batches_and_losses():
    """Six steps queued before any loss is read, batches alternating between two sizes (two
    arenas) and each batch's arrays overwritten as soon as the step is queued: every step must
    have staged its batch before returning, and each loss must be its own step's."""
    ref = graphc.compile_file("models/digits_adamw.nn")
    fast = graphc.compile_file("models/digits_adamw.nn", backend="cuda")
    rng = np.random.default_rng(4)
    batches = [train_batch(ref, 8 if k % 2 else 12, rng) for k in range(6)]
    queued = []
    for batch in batches:
        scratch = {k: v.copy() for k, v in batch.items()}
        queued.append(fast.queue_train_step(**scratch))
        for value in scratch.values():
            value[...] = 0 if value.dtype.kind == "i" else np.nan
    assert fast.step == 6                 # counted on the host, without reading the device
    want = [ref.train_step(**batch) for batch in batches]
    for k, (loss, expected) in enumerate(zip(queued, want)):
        assert_close(float(loss), expected, f"queued step {k}", F32)
    _assert_params_close(fast, ref, "after six queued steps")
    assert int(fast.state["#step"]) == 6


@emulated_only
def test_an_epoch_leaves_the_device_idle_only_at_its_end(device):
    """The train loop queues its steps and reads their losses as they come back: over an epoch
    the host never waits for the device to run dry, except for the last loss."""
    program = graphc.compile_file("models/digits_mlp.nn", backend="cuda")
    settings = TrainSettings.of(program)
    data = prepare_data(program, settings)
    x, y = data.splits["train"]
    x, y = x[:8 * settings.batch], y[:8 * settings.batch]
    trainer = Trainer(program, settings, data)
    trainer.train_epoch(x[:settings.batch], y[:settings.batch])   # compiles, allocates
    before = dict(device.stats)
    row = trainer.train_epoch(x, y)
    assert program.step == 9 and np.isfinite(row["loss"])
    assert device.stats["launches"] - before["launches"] > 8
    assert device.stats["drained"] - before["drained"] == 1


def test_a_label_out_of_range_stops_the_step_before_any_update():
    program = graphc.compile_file("models/digits_mlp.nn", backend="cuda")
    rng = np.random.default_rng(2)
    batch = train_batch(program, 8, rng)
    before = {k: v.copy() for k, v in program.params.items()}
    batch["y"][3] = 10
    with pytest.raises(GraphcError, match=r"class label 10 is out of range \[0, 10\)"):
        program.train_step(**batch)
    for name, value in program.params.items():
        np.testing.assert_array_equal(value, before[name])
    assert program.step == 0


def test_a_failed_queued_step_stops_the_steps_queued_behind_it():
    """Step 2 of 3 has a label out of range: reading its loss raises, step 3 (queued behind it,
    a batch of another size) changed nothing either, and the program goes on from step 1's
    parameters."""
    ref = graphc.compile_file("models/digits_mlp.nn")
    fast = graphc.compile_file("models/digits_mlp.nn", backend="cuda")
    rng = np.random.default_rng(5)
    good, bad, after = train_batch(ref, 8, rng), train_batch(ref, 8, rng), train_batch(ref, 5, rng)
    bad["y"][5] = -1
    first = fast.queue_train_step(**good)
    failed = fast.queue_train_step(**bad)
    behind = fast.queue_train_step(**after)
    assert_close(float(first), ref.train_step(**good), "step 1", F32)
    with pytest.raises(GraphcError, match=r"class label -1 is out of range"):
        float(failed)
    assert fast.step == 1
    _assert_params_close(fast, ref, "after the failed step")
    with pytest.raises(GraphcError, match=r"class label -1 is out of range"):
        float(behind)                     # it did not run either
    for k in range(3):                    # and the slots it held raise nothing more
        batch = train_batch(ref, 8, rng)
        assert_close(fast.train_step(**batch), ref.train_step(**batch), f"step {k} after", F32)
    _assert_params_close(fast, ref, "after the steps after")
    assert fast.step == ref.step == 4


def test_a_failed_step_found_by_queuing_raises_there():
    """Nobody reads the failed step's loss: queuing into its slot finds the failure and raises."""
    ref = graphc.compile_file("models/digits_mlp.nn")
    fast = graphc.compile_file("models/digits_mlp.nn", backend="cuda")
    rng = np.random.default_rng(6)
    good, bad = train_batch(ref, 8, rng), train_batch(ref, 8, rng)
    bad["y"][0] = 12
    fast.queue_train_step(**good)
    fast.queue_train_step(**bad)
    fast.queue_train_step(**good)
    with pytest.raises(GraphcError, match=r"class label 12 is out of range"):
        for _ in range(SLOTS):
            fast.queue_train_step(**good)
    ref.train_step(**good)
    assert fast.step == ref.step == 1
    _assert_params_close(fast, ref, "after the failure")


def test_a_parameter_assigned_between_queued_steps_is_used_from_the_next_step():
    ref = graphc.compile_file("models/digits_mlp.nn")
    fast = graphc.compile_file("models/digits_mlp.nn", backend="cuda")
    rng = np.random.default_rng(7)
    batches = [train_batch(ref, 8, rng) for _ in range(4)]
    name = next(iter(ref.params))
    value = rng.standard_normal(ref.params[name].shape).astype(np.float32) * 0.1
    for program in (ref, fast):
        losses = [program.queue_train_step(**b) for b in batches[:2]]
        program.params[name] = value          # while the steps may still be queued
        losses += [program.queue_train_step(**b) for b in batches[2:]]
        program.losses = [float(loss) for loss in losses]
    assert_close(np.array(fast.losses), np.array(ref.losses), "losses", F32)
    _assert_params_close(fast, ref, "after the assignment")


def test_checkpoints_move_between_backends(tmp_path):
    from graphc.runtime.checkpoint import load_checkpoint, save_checkpoint
    rng = np.random.default_rng(3)
    gpu = graphc.compile_file("models/digits_mlp.nn", backend="cuda")
    cpu = graphc.compile_file("models/digits_mlp.nn")
    for _ in range(3):
        gpu.queue_train_step(**train_batch(gpu, 16, rng))
    save_checkpoint(tmp_path / "c.npz", gpu, {})
    load_checkpoint(tmp_path / "c.npz", cpu)
    assert cpu.step == 3
    batch = train_batch(cpu, 16, rng)
    assert_close(gpu.evaluate(**batch)["loss"], cpu.evaluate(**batch)["loss"], "after the move")
    # and back: the device takes the loaded arrays (new objects) at its next step
    cpu.train_step(**batch)
    load_checkpoint(tmp_path / "c.npz", gpu)
    save_checkpoint(tmp_path / "d.npz", cpu, {})
    load_checkpoint(tmp_path / "d.npz", gpu)
    assert gpu.step == 4
    _assert_params_close(gpu, cpu, "loaded onto the device")
    batch = train_batch(cpu, 16, rng)
    assert_close(gpu.train_step(**batch), cpu.train_step(**batch), "a step after loading", F32)


def test_graphc_train_runs_on_the_cuda_backend(tmp_path):
    """`graphc train --backend cuda` end to end (an epoch of the digits), scored like the llvm
    backend's run of the same file and seed."""
    runs = {}
    for backend in ("llvm", "cuda"):
        env = emulated_env() if backend == "cuda" and GPU_PROBLEM is not None else None
        done = subprocess.run([sys.executable, "-m", "graphc", "train", "models/digits_mlp.nn",
                               "--backend", backend, "--epochs", "1", "--out",
                               str(tmp_path / backend)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        runs[backend] = json.loads((tmp_path / backend / "scores.json").read_text())
    assert abs(runs["cuda"]["test"]["loss"] - runs["llvm"]["test"]["loss"]) < 1e-3
    assert abs(runs["cuda"]["test"]["accuracy"] - runs["llvm"]["test"]["accuracy"]) < 0.01
