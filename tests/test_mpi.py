"""Data-parallel training on MPI (graphc.runtime.distributed): the all-reduce in the train step,
its split on a compiled backend, and `graphc train --ranks 2` / `mpiexec -n 2` on this machine
against one process, with rank-0-only writing, resume, refusals and a rank that dies."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from graphc.api import build_program
from graphc.compiler import check_source, read_source
from graphc.errors import GraphcError
from graphc.ir import collective
from graphc.mpi_cli import mpiexec

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_mlp.nn"
MPIEXEC = mpiexec()
needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
                               reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")
TIMEOUT = 60          # seconds for any one command: a hang fails the test instead of CI
# After one epoch (17 Adam steps at global batch 64), 2 ranks and 1 process differ by float32
# summation order only: each gradient of a 64-row batch is two 32-row sums added, instead of
# one 64-row sum (a few ulp of each gradient element); Adam's steps are bounded by lr, so the
# parameters (|W| < 1) stay within 1e-6 (measured: 6e-8, one ulp of the largest weight).
ATOL, RTOL = 1e-6, 1e-5


def digits_without_dropout(tmp_path: Path) -> Path:
    """digits_mlp without its dropout: each rank draws its own dropout masks (a mask over its
    rows, keyed by its rank), so only a model without dropout matches one process bit for bit
    up to summation order."""
    text = DIGITS.read_text()
    assert " -> dropout(0.2)" in text
    path = tmp_path / "digits_mlp.nn"
    path.write_text(text.replace(" -> dropout(0.2)", ""))
    return path


def run(command: list, cwd=REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """`command` in a session of its own, all of which is killed if it outlives TIMEOUT: a hung
    rank fails the test instead of outliving it."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PMI_", "GRAPHC_FAULT", "OMPI_", "PMIX_"))}
    proc = subprocess.Popen(list(map(str, command)), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**base, **(env or {})},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, command))} still ran after {TIMEOUT} s\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def graphc(*args, cwd=REPO, env: dict | None = None, launcher: list[str] | None = None
           ) -> subprocess.CompletedProcess:
    return run((launcher or []) + [sys.executable, "-m", "graphc", *args], cwd, env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def params(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "checkpoints" / "final.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith(("param/", "state/"))}


# --- in one process ---------------------------------------------------------------------------

def test_one_rank_builds_the_train_step_of_today():
    checked = check_source(read_source(DIGITS), str(DIGITS))
    one, two = (build_program(checked, None, "numpy", ranks=n) for n in (1, 2))
    assert not any(n.op == "all_reduce" for n in one.graphs["train_step"].nodes())
    reduces = [n for n in two.graphs["train_step"].nodes() if n.op == "all_reduce"]
    sizes = sum(p.count for p in two.param_info.values())
    assert len(reduces) == 1 and reduces[0].shape == (sizes + 1,)    # every gradient, the loss
    assert two.meta["ranks"] == 2 and "ranks" not in one.meta


class Doubling:
    """A stand-in group of two ranks whose other rank holds 3x this one's values: `mean` gives
    2x, so a step shows where the reduction happened."""
    size, rank = 2, 0

    def __init__(self):
        self.calls = 0

    def all_reduce(self, buffer, op):
        self.calls += 1
        buffer *= 2


BATCH_NORM = """model bn {
    input x: f32[N, 5]
    input y: i64[N]
    output logits = x -> linear(4) -> batchnorm -> relu -> linear(3)
    loss = cross_entropy(logits, y)
}
train bn { data = digits
 optimizer = sgd(lr=0.1)
 batch = 8 }
"""


def test_running_statistics_are_averaged_in_the_same_buffer():
    """Batch norm's new running statistics ride in the gradients' buffer (one MPI call): with a
    group whose all-reduce doubles, they come out doubled."""
    checked = check_source(BATCH_NORM)
    one, two = (build_program(checked, None, "numpy", ranks=n) for n in (1, 2))
    reduces = [n for n in two.graphs["train_step"].nodes() if n.op == "all_reduce"]
    stats = [p.name for p in two.param_info.values() if p.role == "stat"]
    assert len(stats) == 2 and len(reduces) == 1
    assert reduces[0].shape == (sum(p.count for p in two.param_info.values()) + 1,)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 5)).astype(np.float32), rng.integers(0, 3, 8)
    previous = collective.use(Doubling())
    try:
        two.train_step(x=x, y=y)
    finally:
        collective.use(previous)
    one.train_step(x=x, y=y)
    for name in stats:
        np.testing.assert_allclose(two.params[name], 2 * one.params[name], rtol=1e-6, err_msg=name)


def device_for(backend: str):
    """The context a backend's test runs in: the emulated device for cuda where pycuda finds no
    GPU (skipped without g++), else nothing."""
    if backend != "cuda":
        return contextlib.nullcontext()
    from cuda_emulator import CXX
    from emulated_device import emulated_pycuda, gpu_problem
    if gpu_problem() is None:
        return contextlib.nullcontext()
    if CXX is None:
        pytest.skip("neither a GPU nor g++ for the emulated device")
    return emulated_pycuda()


@pytest.mark.parametrize("backend", ["numpy", "llvm", "cuda"])
def test_the_reduction_sits_between_gradients_and_update(backend):
    """With a group whose all-reduce doubles, a step equals a one-process step on doubled
    gradients (plain SGD: the update is linear in them), and the loss is doubled: one call per
    step, on the numpy backend inside the graph, on llvm and cuda between their two native
    parts (cuda on the emulated device where pycuda finds no GPU)."""
    device = device_for(backend)
    with device:
        _reduction_between_gradients_and_update(backend)


def _reduction_between_gradients_and_update(backend):
    source = ("model m {\n    input x: f32[N, 3]\n    input y: f32[N, 2]\n"
              "    output p = x -> linear(2)\n    loss = mse(p, y)\n}\n"
              "train m { data = digits\n optimizer = sgd(lr=0.1)\n batch = 4 }\n")
    checked = check_source(source)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    two = build_program(checked, None, backend, ranks=2)
    ref = build_program(checked, None, "numpy")
    loss, grads = ref.loss_and_grads(x=x, y=y)
    group = Doubling()
    previous = collective.use(group)
    try:
        got = two.train_step(x=x, y=y)
    finally:
        collective.use(previous)
    assert group.calls == 1
    np.testing.assert_allclose(got, 2 * loss, rtol=1e-6)
    for name, value in ref.params.items():
        want = value - 0.1 * 2 * grads[name]
        np.testing.assert_allclose(two.params[name], want, rtol=1e-5, atol=1e-7, err_msg=name)


SUM_LOSS = ("model m {\n    input x: f32[N, 3]\n    input y: f32[N, 2]\n"
            "    param W: f32[3, 2] = normal(0.1)\n    output p = x @ W\n"
            "    loss = LOSS\n}\ntrain m { data = digits\n optimizer = sgd(lr=0.1)\n batch = 4 }\n")


@pytest.mark.parametrize("loss", ["sum((p - y) * (p - y))", "mse(p, y) + sum(p)",
                                  "sqrt(mse(p, y))", "mean(sum((p - y) * (p - y), axis=0))",
                                  "mse(p, y) * mean(p)"])
def test_a_loss_that_is_not_a_batch_mean_is_refused_for_ranks(loss):
    """Averaging the ranks' gradients gives one process's gradient only for a mean over the batch:
    a sum's would be 1/N of it. Refused at the loss line; one process compiles it."""
    checked = check_source(SUM_LOSS.replace("LOSS", loss), "m.nn")
    build_program(checked, None, "numpy")
    with pytest.raises(GraphcError) as caught:
        build_program(checked, None, "numpy", ranks=2)
    text = caught.value.render()
    assert text.startswith("m.nn:6:12: error: data-parallel training averages the 2 ranks' gradients; "
                           "this loss is not a mean over the batch"), text
    assert f"loss = {loss}" in text and "^" in text


@pytest.mark.parametrize("loss", ["mse(p, y)", "mean((p - y) * (p - y)) + 1e-3 * l2(W)",
                                  "-(0.5 * mse(p, y) - mean(p)) / 2.0", "mse(p, y) + sum(W * W)"])
def test_batch_means_compile_for_ranks(loss):
    """Built-in mean losses, full means, and their linear combinations with terms that do not read
    the batch; the sum-loss's gradient in the refusal above is what this check keeps out."""
    checked = check_source(SUM_LOSS.replace("LOSS", loss), "m.nn")
    assert build_program(checked, None, "numpy", ranks=2).meta["ranks"] == 2


class Counting:
    """A group of one that counts its all-reduces (each the identity)."""
    size, rank = 1, 0

    def __init__(self):
        self.calls = 0

    def all_reduce(self, buffer: np.ndarray, op: str) -> None:
        self.calls += 1


@pytest.mark.parametrize("backend", ["llvm", "cuda"])
def test_adam_steps_across_the_split_match_one_process(backend):
    """On a compiled backend the train step of N ranks runs in two native parts around the
    all-reduce; Adam's `new #step` is computed in the first and its moments updated in place in
    the second. Over 3 Adam steps in a group of one (the all-reduce is the identity) the
    parameters and optimizer state equal one numpy process's (cuda on the emulated device where
    pycuda finds no GPU)."""
    device = device_for(backend)
    source = ("model m {\n    input x: f32[N, 3]\n    input y: i64[N]\n"
              "    output p = x -> linear(4) -> tanh -> linear(3)\n"
              "    loss = cross_entropy(p, y) + 1e-3 * l2(weights)\n}\n"
              "train m { data = digits\n optimizer = adam(lr=0.05)\n batch = 4 }\n")
    checked = check_source(source)
    rng = np.random.default_rng(1)
    group = Counting()
    with device:
        split = build_program(checked, None, backend, ranks=2)
        ref = build_program(checked, None, "numpy")
        for _ in range(3):
            x = rng.standard_normal((4, 3)).astype(np.float32)
            y = rng.integers(0, 3, 4)
            previous = collective.use(group)
            try:
                loss = split.train_step(x=x, y=y)
            finally:
                collective.use(previous)
            np.testing.assert_allclose(loss, ref.train_step(x=x, y=y), rtol=1e-5)
        assert group.calls == 3 and int(split.state["#step"]) == 3
        for name, value in ref.params.items():
            np.testing.assert_allclose(split.params[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        assert ref.state and ref.state.keys() == split.state.keys()
        for name, value in ref.state.items():
            np.testing.assert_allclose(np.asarray(split.state[name]), np.asarray(value), rtol=1e-5,
                                       atol=1e-7, err_msg=name)


def test_ranks_without_mpi_say_how_to_install(monkeypatch, capsys, tmp_path):
    from graphc import cli, mpi_cli
    monkeypatch.setattr(mpi_cli, "mpiexec", lambda: None)
    assert cli.main(["train", str(DIGITS), "--ranks", "2", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "--ranks 2 starts 2 processes with MPI, but mpiexec is not installed" in err
    assert "pip install -e '.[mpi]'" in err and not (tmp_path / "r").exists()


# --- under mpiexec ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
    """(model, one-process run, 2-rank run, its mpiexec): one epoch of digits_mlp (no dropout) at global
    batch 64; the 2-rank one launched with mpiexec directly, each rank in its own working
    folder (MPMD), so that a write by rank 1 would land apart."""
    tmp = tmp_path_factory.mktemp("mpi")
    model = digits_without_dropout(tmp)
    ok(graphc("train", model, "--epochs", 1, "--batch", 64, "--out", tmp / "one", "--quiet",
              "--backend", "numpy"))
    (tmp / "rank0").mkdir()
    (tmp / "rank1").mkdir()
    args = ["train", str(model), "--epochs", "1", "--batch", "64", "--out", "run",
            "--backend", "llvm"]
    command = [sys.executable, "-m", "graphc", *args]
    proc = ok(run([MPIEXEC, "-n", "1", "-wdir", tmp / "rank0", *command, ":",
                   "-n", "1", "-wdir", tmp / "rank1", *command]))
    return model, tmp / "one", tmp / "rank0" / "run", proc


@needs_mpi
def test_two_ranks_match_one_process_and_rank_0_alone_writes(two_ranks):
    _, one, run, proc = two_ranks
    want, got = params(one), params(run)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)
    assert list(run.parent.parent.joinpath("rank1").iterdir()) == []       # rank 1 wrote nothing
    assert proc.stdout.count("epoch 1:") == 1 and proc.stdout.count("test:") == 1
    assert '"ranks": 2' in (run / "config.json").read_text()


RANK_SCRIPT = """
import sys
import numpy as np
from graphc.api import build_program
from graphc.compiler import check_source, read_source
from graphc.errors import GraphcError
from graphc.runtime.distributed import DistributedTrainer, connect
from graphc.runtime.train import TrainSettings, prepare_data
group = connect()
path, out = sys.argv[1], sys.argv[2]
program = build_program(check_source(read_source(path), path), None, "numpy", ranks=group.size)
settings = TrainSettings.of(program, epochs=1, batch=64)
trainer = DistributedTrainer(group, program, settings, prepare_data(program, settings))
trainer.share_start()
trainer.fit()
np.savez(f"{out}/rank{group.rank}.npz", **dict(program.params.items()), **program.state)
"""


@needs_mpi
def test_every_rank_ends_with_the_same_bits(tmp_path):
    """digits_mlp with its dropout (each rank its own masks) through the Python API: after an
    epoch, both ranks hold the same parameters and optimizer state, bit for bit."""
    ok(run([MPIEXEC, "-n", 2, sys.executable, "-c", RANK_SCRIPT, DIGITS, tmp_path]))
    with np.load(tmp_path / "rank0.npz") as a, np.load(tmp_path / "rank1.npz") as b:
        assert sorted(a.files) == sorted(b.files) and len(a.files) == 4 + 1 + 8
        for name in a.files:
            assert np.array_equal(a[name], b[name]), name
        assert int(a["#step"]) == 17


@needs_mpi
def test_a_run_resumes_on_its_ranks_only(two_ranks, tmp_path):
    model, _, run, _ = two_ranks
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    proc = graphc("train", "--resume", copy, "--epochs", 2)
    assert proc.returncode == 1
    assert "the run was started on 2 ranks; it resumes on 2 ranks only (this is 1 process)" in proc.stderr
    assert f"--resume {copy} --ranks 2" in proc.stderr
    proc = ok(graphc("train", "--resume", copy, "--epochs", 2, "--ranks", 2))
    assert "epoch 2:" in proc.stdout and "epoch 1:" not in proc.stdout
    assert proc.stderr.count("epoch") == 0
    assert (copy / "metrics.csv").read_text().count("\n") == 3            # header, 2 epochs


@needs_mpi
def test_mpiexec_n_1_takes_the_one_process_path_bit_identically(two_ranks, tmp_path):
    """Under `mpiexec -n 1` the job's size is 1, so graphc trains as one process (no MPI group, no
    all-reduce): this checks that mpiexec's environment (PMI_* variables) changes nothing, not
    the distributed code, which the two-rank tests exercise."""
    model, one, _, _ = two_ranks
    ok(graphc("train", model, "--epochs", 1, "--batch", 64, "--out", tmp_path / "run", "--quiet",
              "--backend", "numpy", launcher=[MPIEXEC, "-n", "1"]))
    want, got = params(one), params(tmp_path / "run")
    for name in want:
        assert np.array_equal(got[name], want[name]), name


@needs_mpi
def test_a_batch_the_ranks_do_not_divide_is_refused_once(tmp_path):
    """Said once, by rank 0, without MPI_Abort's message; so are the file's lint warnings (here:
    no seed)."""
    model = tmp_path / "digits_mlp.nn"
    model.write_text(DIGITS.read_text().replace("    seed      = 0\n", ""))
    assert "seed" not in model.read_text().split("train digits_mlp")[1]
    proc = graphc("train", model, "--batch", 63, "--ranks", 2, "--out", tmp_path / "run")
    assert proc.returncode == 1
    assert proc.stderr.count("sets no seed") == 1, proc.stderr
    assert "MPI_Abort" not in proc.stderr, proc.stderr      # every rank met it: a clean end
    assert proc.stderr.count("the global batch 63 does not split evenly across 2 ranks") == 1
    assert "--batch 62" in proc.stderr and not (tmp_path / "run").exists()


@needs_mpi
def test_an_error_on_one_rank_before_training_is_said_and_stops_every_rank(tmp_path):
    """Rank 1 alone is refused (MPMD: its --batch does not split); rank 0 relays its message, and
    MPI_Abort ends the job."""
    command = [sys.executable, "-m", "graphc", "train", DIGITS, "--out", tmp_path / "run",
               "--backend", "numpy", "--batch"]
    proc = run([MPIEXEC, "-n", 1, *command, 64, ":", "-n", 1, *command, 63])
    assert proc.returncode != 0
    assert "rank 1 stopped before training, the others not:" in proc.stderr, proc.stderr
    assert "the global batch 63 does not split evenly across 2 ranks" in proc.stderr
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_ranks_with_other_settings_are_refused_before_the_run_folder(tmp_path):
    """Rank 1 started with another --epochs than rank 0 (MPMD): every rank sees every rank's
    settings before rank 0 creates the run folder; one says so, and MPI_Abort ends the others
    within seconds."""
    command = [sys.executable, "-m", "graphc", "train", DIGITS, "--out", tmp_path / "run",
               "--backend", "numpy", "--epochs"]
    start = time.monotonic()
    proc = run([MPIEXEC, "-n", 1, *command, 2, ":", "-n", 1, *command, 3])
    assert proc.returncode != 0 and time.monotonic() - start < 30
    assert proc.stderr.count("error: rank 1 trains with other settings than rank 0 (epochs differ)") == 1
    assert "MPI_Abort" not in proc.stderr, proc.stderr      # every rank stops there: a clean end
    assert not (tmp_path / "run").exists()       # found before rank 0 creates the run folder


@needs_mpi
def test_a_rank_that_dies_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    proc = graphc("train", DIGITS, "--epochs", 5, "--batch", 64, "--out", out, "--ranks", 2,
                  "--backend", "numpy", env={"GRAPHC_FAULT_KILL_AT_STEP": "3",
                                             "GRAPHC_FAULT_KILL_RANK": "1"})
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert "a rank of the run stopped abnormally" in proc.stderr
    assert "EXIT CODE: 9" in proc.stdout + proc.stderr          # mpiexec names the killed rank
    assert took < 30
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in left, "a rank outlived the run"
    assert not (out / "checkpoints" / "last.npz").exists()      # killed in its first epoch


@needs_mpi
def test_ctrl_c_stops_every_rank_with_one_message(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group: the launcher, mpiexec, the ranks)
    ends the run with rank 0's resume hint, and the launcher sends mpiexec no second SIGINT
    (hydra's "force abort", with its noise)."""
    out = tmp_path / "run"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "GRAPHC_FAULT"))}
    proc = subprocess.Popen([sys.executable, "-m", "graphc", "train", str(DIGITS), "--ranks", "2",
                             "--epochs", "500", "--backend", "numpy", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=base, start_new_session=True,
                            # a terminal's foreground job takes SIGINT; a background job (a suite
                            # started with `&` from a script) inherits it ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + TIMEOUT
        while "epoch 1:" not in proc.stdout.readline() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.count("graphc: interrupted;") == 1 and f"--resume {out} --ranks 2" in err, err
    assert "Ctrl-C caught" not in err and "force abort" not in err and "HYD" not in err, err


@needs_mpi
def test_graphc_train_refuses_a_sum_loss_on_ranks_once(tmp_path):
    """The sum loss of the API test, from the command line: rank 0 says it once, at the loss line,
    and the job ends cleanly with no run folder."""
    model = tmp_path / "m.nn"
    model.write_text(SUM_LOSS.replace("LOSS", "sum((p - y) * (p - y))").replace(
        "batch = 4 }", "batch = 4\n seed = 0 }"))
    proc = graphc("train", model, "--ranks", 2, "--out", tmp_path / "run")
    assert proc.returncode == 1
    assert proc.stderr.count(f"{model}:6:12: error: data-parallel training averages the 2 ranks' "
                             f"gradients; this loss is not a mean over the batch") == 1, proc.stderr
    assert "    loss = sum((p - y) * (p - y))" in proc.stderr and "Traceback" not in proc.stderr
    assert "MPI_Abort" not in proc.stderr and not (tmp_path / "run").exists()


@needs_mpi
def test_training_by_steps_is_refused_for_ranks_once(tmp_path):
    """A language model on text trains by steps in one process: --ranks says so once, cleanly,
    before any run folder exists."""
    from test_text_steps import MODEL, TEXT
    (tmp_path / "tiny.txt").write_text(TEXT)
    (tmp_path / "lm.nn").write_text(MODEL.replace("V, 16", f"{len(set(TEXT))}, 16"))
    proc = graphc("train", tmp_path / "lm.nn", "--ranks", 2, "--out", tmp_path / "run")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("training by steps (text data) runs in one process") == 1, proc.stderr
    assert "MPI_Abort" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
