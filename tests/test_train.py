"""Training end to end: `graphc train` and its run folder, bit-identical reproducibility and
crash-safe resume (the process SIGKILLs itself mid-epoch), early stopping, command-line overrides,
`graphc eval` and `graphc predict`, data errors through the command line, the Python training
API (train_step, loss_and_grads, evaluate, dropout modes), and every bundled model with a train
block training for two epochs."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, REPO

import graphc
from graphc.cli import main
from graphc.errors import GraphcError
from graphc.runtime import load_artifact
from graphc.runtime.augment import BLOCK
from graphc.runtime.checkpoint import load_checkpoint
from graphc.runtime.data import Scaler
from graphc.runtime.program import ProgramError
from graphc.runtime.runs import METRIC_COLUMNS
from graphc.runtime.schedules import make_schedule
from graphc.runtime.train import EVAL_BATCH, KILL_AT_STEP, Data, Trainer, TrainSettings, prepare_data
from graphc.targets import auto_backend

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DIGITS_MLP = "models/digits_mlp.nn"
EPOCHS = 5
TEST_LINE = re.compile(r"^test: loss (\d+\.\d{4}), accuracy (\d+\.\d{2})%$")
KILLED = (-signal.SIGKILL, 128 + signal.SIGKILL)


# --- helpers -----------------------------------------------------------------------------------

def graphc_cmd(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m graphc ARGS` in a child process, from the repository root."""
    base = {k: v for k, v in os.environ.items() if k not in (KILL_AT_STEP, "GRAPHC_DATA")}
    return subprocess.run([sys.executable, "-m", "graphc", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env={**base, **(env or {})},
                          timeout=300)


def cli(capsys, *args) -> tuple[int, str, str]:
    """`graphc ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:           # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def clean_error(code: int, err: str) -> None:
    """A user mistake: exit status 1 and a diagnostic, never a traceback."""
    assert code == 1, err
    assert "error" in err
    assert "Traceback" not in err and "internal error" not in err


def params_of(run: Path) -> dict[str, np.ndarray]:
    """The trained parameters of a run (not the constants of its preprocessing, x#mean and
    x#std, which trained/ holds besides)."""
    with np.load(run / "trained" / "params.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files if "#" not in k}


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def checkpoint_arrays(path: Path) -> tuple[dict, dict]:
    """(parameters, loop meta) of a checkpoint file, read directly."""
    with np.load(path, allow_pickle=False) as npz:
        params = {k[len("param/"):]: npz[k] for k in npz.files if k.startswith("param/")}
        meta = json.loads(str(npz["meta"]))
    return params, meta


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")}
            for row in rows]


def scores(run: Path) -> dict:
    return json.loads((run / "scores.json").read_text())


def scores_line(s: dict) -> str:
    return f"test: loss {s['loss']:.4f}, accuracy {100 * s['accuracy']:.2f}%"


def steps_per_epoch(run: Path) -> int:
    config = json.loads((run / "config.json").read_text())
    return math.ceil(config["data"]["sizes"]["train"] / config["settings"]["batch"])


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("GRAPHC_DATA", raising=False)
    monkeypatch.delenv(KILL_AT_STEP, raising=False)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The main job, uninterrupted, for EPOCHS epochs: the reference for several tests."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    proc = ok(graphc_cmd("train", DIGITS_MLP, "--out", run, "--epochs", EPOCHS, "--quiet"))
    return run, proc


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """The main job for 2 epochs with its own seed (0)."""
    run = tmp_path_factory.mktemp("short") / "run"
    ok(graphc_cmd("train", DIGITS_MLP, "--out", run, "--epochs", 2, "--quiet"))
    return run


@pytest.fixture(scope="module")
def digits_batch() -> tuple[np.ndarray, np.ndarray]:
    """64 standardized training samples of the digits, as digits_mlp is trained on."""
    p = graphc.compile_file(REPO / DIGITS_MLP)
    x, y = prepare_data(p, TrainSettings.of(p)).splits["train"]
    return x[:64], y[:64]


# --- 1. the run folder -------------------------------------------------------------------------

def test_train_writes_a_complete_run_folder(baseline):
    run, proc = baseline
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and TEST_LINE.match(lines[-1]), proc.stdout     # --quiet: the result only
    assert "Traceback" not in proc.stderr
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "scores.json",
                 "checkpoints/last.npz", "checkpoints/best.npz", "model/manifest.json",
                 "model/graph.json", "model/params.npz"):
        assert (run / name).is_file(), name

    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "digits_mlp" and config["graphc_version"] == graphc.__version__
    assert config["settings"]["epochs"] == EPOCHS and config["settings"]["batch"] == 32
    assert config["settings"]["optimizer"][0] == "adam"
    assert config["data"]["sizes"] == {"train": 1079, "val": 359, "test": 359}
    assert config["data"]["scaler"]["mode"] == "standardize"

    with open(run / "metrics.csv", newline="") as f:
        assert f.readline().strip() == ",".join(METRIC_COLUMNS)
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    losses = [float(r["loss"]) for r in rows]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert float(rows[-1]["val_accuracy"]) > 0.8
    # the file's cosine(epochs=40) schedule from 2e-3, read before each epoch
    assert [float(r["lr"]) for r in rows] == pytest.approx(
        [2e-3 * (1 + math.cos(math.pi * e / 40)) / 2 for e in range(EPOCHS)], rel=1e-12)
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in jsonl] == losses       # the same numbers, not merely close
    assert [r["val_loss"] for r in jsonl] == [float(r["val_loss"]) for r in rows]

    program = load_artifact(run / "trained")
    assert program.name == "digits_mlp"
    assert same_params(dict(program.params), dict(load_artifact(run / "model").params)) is False
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    probs = program.forward(x=x)["probs"]
    assert probs.shape == (3, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    final = params_of(run)
    last, meta = checkpoint_arrays(run / "checkpoints" / "last.npz")
    assert same_params(last, final)                  # no early stopping: the model is the last
    assert meta["loop"]["epoch"] == EPOCHS and meta["model"] == "digits_mlp"
    assert meta["rng"]["step"] == EPOCHS * steps_per_epoch(run)
    assert load_checkpoint(run / "checkpoints" / "best.npz", program)["loop"]["epoch"] >= 1

    s = scores(run)
    assert s["epochs"] == EPOCHS and s["stopped_early"] is False
    assert s["val"]["loss"] == float(rows[-1]["val_loss"])
    assert 0.8 < s["test"]["accuracy"] <= 1
    assert lines[-1] == scores_line(s["test"])


def test_train_prints_a_line_per_epoch_without_quiet(tmp_path, capsys):
    code, out, _ = cli(capsys, "train", DIGITS_MLP, "--out", tmp_path / "r", "--epochs", 2)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("training digits_mlp on digits (1,079 train / 359 val / 359 test)")
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1",
                                                                                   "epoch 2"]
    assert TEST_LINE.match(lines[-2]) and lines[-1] == f"run saved to {tmp_path / 'r'}"


# --- 2. reproducibility ------------------------------------------------------------------------

def test_same_seed_gives_bit_identical_parameters(short_run, tmp_path, capsys):
    again = tmp_path / "again"          # in this process, where short_run ran in another
    code, _, err = cli(capsys, "train", DIGITS_MLP, "--out", again, "--epochs", 2, "--quiet",
                       "--seed", 0)
    assert code == 0, err
    assert same_params(params_of(again), params_of(short_run))
    assert without_timing(metrics(again)) == without_timing(metrics(short_run))
    assert scores(again) == scores(short_run)


def test_another_seed_gives_other_parameters(short_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert cli(capsys, "train", DIGITS_MLP, "--out", other, "--epochs", 2, "--quiet",
               "--seed", 1)[0] == 0
    a, b = params_of(other), params_of(short_run)
    assert a.keys() == b.keys() and not any(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((other / "config.json").read_text())["settings"]["seed"] == 1


# --- 3. crash and resume -----------------------------------------------------------------------

def test_crash_mid_epoch_then_resume_matches_an_uninterrupted_run(baseline, tmp_path, capsys):
    reference, reference_proc = baseline
    run = tmp_path / "run"
    per_epoch = steps_per_epoch(reference)           # 34: 1079 samples in batches of 32
    kill_at = 2 * per_epoch + per_epoch // 3         # a third into epoch 3
    proc = graphc_cmd("train", DIGITS_MLP, "--out", run, "--epochs", EPOCHS, "--quiet",
                      env={KILL_AT_STEP: str(kill_at)})
    assert proc.returncode in KILLED, (proc.returncode, proc.stderr)
    assert "test:" not in proc.stdout and not (run / "scores.json").exists()

    # the last checkpoint is that of epoch 2, complete and loadable
    meta = load_checkpoint(run / "checkpoints" / "last.npz", load_artifact(run / "model"))
    assert meta["loop"]["epoch"] == 2 and meta["rng"]["step"] == 2 * per_epoch
    assert len(metrics(run)) == 2
    assert without_timing(metrics(run)) == without_timing(metrics(reference))[:2]

    # leftovers of a crash in the middle of an atomic write: temporary files beside the real ones
    last = (run / "checkpoints" / "last.npz").read_bytes()
    (run / "checkpoints" / ".last.npz.x7k2m9q1").write_bytes(last[: len(last) // 2])
    (run / "checkpoints" / ".best.npz.a1b2c3d4").write_bytes(b"PK\x03\x04")
    (run / ".metrics.csv.zz9abc01").write_text("epoch,lr\n1,0.0")
    (run / "model" / ".params.npz.q0w9e8r7").write_bytes(b"")

    code, out, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0, err
    assert out == reference_proc.stdout
    assert same_params(params_of(run), params_of(reference))
    rows = metrics(run)
    assert len(rows) == EPOCHS
    assert without_timing(rows) == without_timing(metrics(reference))
    assert scores(run) == scores(reference)
    final, _ = checkpoint_arrays(run / "checkpoints" / "last.npz")
    best, _ = checkpoint_arrays(run / "checkpoints" / "best.npz")
    ref_best, _ = checkpoint_arrays(reference / "checkpoints" / "best.npz")
    assert same_params(final, params_of(reference)) and same_params(best, ref_best)


def test_resume_before_the_first_checkpoint_starts_from_step_0(short_run, tmp_path, capsys):
    run = tmp_path / "run"
    proc = graphc_cmd("train", DIGITS_MLP, "--out", run, "--epochs", 2, "--quiet",
                      env={KILL_AT_STEP: "5"})
    assert proc.returncode in KILLED
    assert (run / "config.json").is_file() and not (run / "checkpoints" / "last.npz").exists()
    leftovers = [run / "checkpoints" / ".last.npz.x7k2m9q1", run / ".metrics.csv.zz9abc01"]
    for tmp in leftovers:
        tmp.write_bytes(b"PK\x03\x04")
    keep = run / "checkpoints" / "notes.txt"       # not a temporary file: left alone
    keep.write_text("mine")
    code, out, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0, err
    assert same_params(params_of(run), params_of(short_run))
    assert scores(run) == scores(short_run)
    assert not any(tmp.exists() for tmp in leftovers) and keep.read_text() == "mine"


def test_resume_refuses_changed_settings(baseline, capsys):
    run, _ = baseline
    before = (run / "config.json").read_text()
    for flag, value in (("--lr", "0.1"), ("--seed", "3"), ("--batch", "8"),
                        ("--out", str(run.parent / "elsewhere"))):
        code, _, err = cli(capsys, "train", "--resume", run, flag, value)
        clean_error(code, err)
        assert f"{flag} cannot be given with it" in err, err
        assert "--epochs" in err                     # the hint: what may change
    code, _, err = cli(capsys, "train", DIGITS_MLP, "--resume", run)
    clean_error(code, err)
    assert "FILE cannot be given with it" in err
    assert (run / "config.json").read_text() == before


@pytest.mark.parametrize("what", ["empty folder", "missing folder", "artifact"])
def test_resume_on_a_folder_that_is_not_a_run(what, tmp_path, capsys):
    target = tmp_path / "target"
    if what == "empty folder":
        target.mkdir()
    elif what == "artifact":
        assert cli(capsys, "build", DIGITS_MLP, "-o", target)[0] == 0
    code, _, err = cli(capsys, "train", "--resume", target)
    clean_error(code, err)
    assert str(target) in err and "not a graphc run folder" in err, err
    assert "graphc train FILE.nn --out DIR" in err


def test_out_pointing_at_an_existing_run_is_refused(baseline, capsys):
    run, _ = baseline
    before = params_of(run)
    code, out, err = cli(capsys, "train", DIGITS_MLP, "--out", run, "--epochs", 1, "--quiet")
    clean_error(code, err)
    assert f"{run}: already holds a run" in err
    assert f"--resume {run}" in err
    assert out == "" and same_params(params_of(run), before)


def test_resume_with_more_epochs_trains_longer(baseline, tmp_path, capsys):
    reference, _ = baseline
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    code, out, err = cli(capsys, "train", "--resume", run, "--epochs", EPOCHS + 1)
    assert code == 0, err
    assert out.startswith("resuming digits_mlp on digits") and f"epoch {EPOCHS + 1}: " in out
    assert "epoch 1:" not in out
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 2))
    assert without_timing(rows[:EPOCHS]) == without_timing(metrics(reference))
    assert scores(run)["epochs"] == EPOCHS + 1


def test_resume_after_a_crash_while_training_longer(baseline, tmp_path, capsys):
    reference, _ = baseline
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    kill_at = (EPOCHS + 1) * steps_per_epoch(reference) + 5            # in epoch EPOCHS + 2
    proc = graphc_cmd("train", "--resume", run, "--epochs", EPOCHS + 2, "--quiet",
                      env={KILL_AT_STEP: str(kill_at)})
    assert proc.returncode in KILLED
    assert len(metrics(run)) == EPOCHS + 1
    assert cli(capsys, "train", "--resume", run, "--quiet")[0] == 0
    assert len(metrics(run)) == EPOCHS + 2


def test_a_crash_while_exporting_the_trained_model_can_be_resumed(baseline, tmp_path, capsys):
    """`trained/` is written last, file by file; simulate a crash between its params.npz and its
    manifest.json. model/ (never rewritten) and the checkpoints still resume and evaluate."""
    reference, reference_proc = baseline
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.copy(run / "model" / "manifest.json", run / "trained" / "manifest.json")
    code, out, err = cli(capsys, "eval", run)          # eval reads checkpoints/final.npz
    assert code == 0, err
    code, out, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0, err
    assert out == reference_proc.stdout
    assert same_params(params_of(run), params_of(reference))
    assert load_artifact(run / "trained").name == "digits_mlp"

def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, capsys):
    run = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "graphc", "train", DIGITS_MLP, "--out", str(run), "--epochs", "40",
         "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != KILL_AT_STEP},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        # The header is written before the first epoch, the checkpoint after its row: wait for
        # a finished epoch's checkpoint.
        while not (run / "checkpoints" / "last.npz").exists() and child.poll() is None:
            assert time.monotonic() < deadline, "no epoch finished within a minute"
            time.sleep(0.005)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, (child.returncode, err)
    assert "Traceback" not in err and "test:" not in out
    m = re.search(r"graphc: interrupted; (.+) holds (\d+) finished epochs?"
                  r": continue with graphc train --resume (.+)$", err, re.M)
    assert m, err
    assert m[1] == m[3] == str(run)
    done = int(m[2])
    assert 1 <= done < 40
    _, meta = checkpoint_arrays(run / "checkpoints" / "last.npz")
    assert meta["loop"]["epoch"] in (done, done - 1)   # see the next test for the exact count
    code, out, err = cli(capsys, "train", "--resume", run, "--quiet", "--epochs", done + 1)
    assert code == 0, err
    assert TEST_LINE.match(out.strip())
    assert [int(r["epoch"]) for r in metrics(run)] == list(range(1, done + 2))


def test_ctrl_c_while_saving_a_checkpoint_reports_what_the_folder_holds(tmp_path, capsys,
                                                                        monkeypatch):
    import graphc.runtime.train as train_module
    real = train_module.save_checkpoint

    def interrupted_at_epoch_2(path, program, state):
        if Path(path).name == "last.npz" and state["loop"]["epoch"] == 2:
            raise KeyboardInterrupt
        real(path, program, state)

    monkeypatch.setattr(train_module, "save_checkpoint", interrupted_at_epoch_2)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", DIGITS_MLP, "--out", run, "--epochs", 4, "--quiet")
    assert code == 130
    _, meta = checkpoint_arrays(run / "checkpoints" / "last.npz")
    assert meta["loop"]["epoch"] == 1
    assert f"{run} holds 1 finished epoch:" in err, err


# --- 4. early stopping -------------------------------------------------------------------------

EARLY_STOP_NN = """
model es {
    input x: f32[N, 64]
    input y: i64[N]
    logits = x -> linear(32) -> relu -> linear(10)
    output probs = softmax(logits, axis=1)
    loss = cross_entropy(logits, y)
}
train es {
    data       = digits
    scale      = standardize
    optimizer  = sgd(lr=0.3)        # large enough that the validation loss soon rises
    early_stop = early_stop(patience=1)
    batch      = 16
    epochs     = 20
}
"""


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("early")
    source = folder / "es.nn"
    source.write_text(EARLY_STOP_NN)
    run = folder / "run"
    return source, run, ok(graphc_cmd("train", source, "--out", run))


def test_early_stopping_restores_the_best_parameters(early_stopped):
    source, run, proc = early_stopped
    s = scores(run)
    rows = metrics(run)
    assert s["stopped_early"] is True and s["epochs"] < 20 and len(rows) == s["epochs"]
    assert s["best_epoch"] == s["epochs"] - 1                     # patience 1
    val_losses = [float(r["val_loss"]) for r in rows]
    assert val_losses.index(min(val_losses)) + 1 == s["best_epoch"]
    assert val_losses[-1] >= min(val_losses)
    assert s["val"]["loss"] == min(val_losses)                    # scored with the best parameters
    best, best_meta = checkpoint_arrays(run / "checkpoints" / "best.npz")
    last, _ = checkpoint_arrays(run / "checkpoints" / "last.npz")
    assert best_meta["loop"]["epoch"] == s["best_epoch"]
    assert same_params(params_of(run), best)
    assert not same_params(params_of(run), last)
    assert (f"early stop after epoch {s['epochs']}: restored the parameters of epoch "
            f"{s['best_epoch']}") in proc.stdout


def test_early_stopping_survives_a_crash_after_the_best_epoch(early_stopped, tmp_path, capsys):
    source, reference, _ = early_stopped
    s = scores(reference)
    run = tmp_path / "run"
    kill_at = (s["epochs"] - 1) * steps_per_epoch(reference) + 3   # in the last epoch
    proc = graphc_cmd("train", source, "--out", run, "--quiet", env={KILL_AT_STEP: str(kill_at)})
    assert proc.returncode in KILLED
    assert cli(capsys, "train", "--resume", run, "--quiet")[0] == 0
    assert scores(run) == s
    assert same_params(params_of(run), params_of(reference))


def test_early_stopping_through_the_api():
    program = graphc.compile_source(EARLY_STOP_NN)
    settings = TrainSettings.of(program)
    trainer = Trainer(program, settings, prepare_data(program, settings))
    result = trainer.fit()
    assert trainer.loop.stopped_early and trainer.loop.best_epoch == trainer.loop.epoch - 1
    assert same_params(dict(program.params), trainer.best_params)
    assert result["val"]["loss"] == trainer.loop.best


# --- 5. overrides and artifacts ----------------------------------------------------------------

def test_command_line_overrides_reach_the_config_and_take_effect(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", DIGITS_MLP, "--out", run, "--epochs", 3, "--batch", 64,
                       "--lr", "0.005", "--seed", 3, "--quiet")
    assert code == 0, err
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert (settings["epochs"], settings["batch"], settings["seed"]) == (3, 64, 3)
    assert settings["optimizer"][1]["lr"] == 0.005
    assert settings["optimizer"][1]["beta1"] == 0.9          # the rest of the train block stays
    rows = metrics(run)
    assert len(rows) == 3 and float(rows[0]["lr"]) == 0.005       # the schedule starts from it
    _, meta = checkpoint_arrays(run / "checkpoints" / "last.npz")
    assert meta["seed"] == 3
    assert meta["rng"]["step"] == 3 * math.ceil(1079 / 64)   # 17 batches of 64 per epoch
    program = load_artifact(run / "model")
    assert program.meta["train"]["batch"] == 64 and program.seed == 3
    # the seed initializes the parameters too
    seeded, default = (graphc.compile_file(REPO / DIGITS_MLP, seed=s) for s in (3, None))
    weights = [k for k, info in default.param_info.items() if info.role == "weight"]
    assert len(weights) == 2
    assert not any(np.array_equal(seeded.params[k], default.params[k]) for k in weights)


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--batch", "-1"], ["--lr", "0"],
                                  ["--lr", "fast"], ["--seed", "-2"]])
def test_bad_override_values_are_usage_errors(argv, capsys, tmp_path):
    code, _, err = cli(capsys, "train", DIGITS_MLP, "--out", tmp_path / "r", *argv)
    assert code == 2 and "usage: graphc" in err
    assert not (tmp_path / "r").exists()


def test_train_a_built_artifact(short_run, tmp_path, capsys):
    art = tmp_path / "art"
    assert cli(capsys, "build", DIGITS_MLP, "-o", art)[0] == 0
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", art, "--epochs", 2, "--out", run, "--quiet")
    assert code == 0, err
    assert TEST_LINE.match(out.strip())
    assert len(metrics(run)) == 2
    # the artifact holds the same initial parameters and train block as the .nn file
    assert same_params(params_of(run), params_of(short_run))
    assert scores(run) == scores(short_run)


def test_device_picks_the_backend_unless_one_is_named(tmp_path, capsys):
    """`device = cuda` trains on the cuda backend; without pycuda or a GPU that is one clear
    error before any run folder exists. --backend overrides the device, and the run records it."""
    source = tmp_path / "m.nn"
    source.write_text((REPO / DIGITS_MLP).read_text().replace("seed", "device = cuda\n    seed"))
    # cpu: the train block's `backend`, auto by default (llvm where llvmlite loads)
    assert graphc.compile_file(REPO / DIGITS_MLP, backend=None).backend == auto_backend()
    program = graphc.compile_file(source, backend=None)
    assert program.backend == "cuda" and program.meta["train"]["device"] == "cuda"
    assert graphc.compile_file(source, backend="llvm").backend == "llvm"
    if importlib.util.find_spec("pycuda") is None:
        code, _, err = cli(capsys, "train", source, "--out", tmp_path / "gpu", "--quiet")
        clean_error(code, err)
        assert "the cuda backend needs pycuda" in err and not (tmp_path / "gpu").exists()
    run = tmp_path / "cpu"
    code, _, err = cli(capsys, "train", source, "--backend", "numpy", "--epochs", 1,
                       "--out", run, "--quiet")
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["settings"]["device"] == "cuda"
    assert load_artifact(run / "model").backend == "numpy"        # loading names no backend
    assert load_artifact(run / "model", backend=None).backend == "cuda"


def test_a_train_block_names_its_backend_and_auto_falls_back_to_numpy(tmp_path, monkeypatch,
                                                                     caplog):
    source = tmp_path / "m.nn"
    source.write_text((REPO / DIGITS_MLP).read_text().replace("seed", "backend = llvm\n    seed"))
    program = graphc.compile_file(source, backend=None)
    assert program.backend == "llvm" and program.meta["train"]["backend"] == "llvm"
    assert graphc.compile_file(source, backend="numpy").backend == "numpy"
    assert graphc.compile_file(source, backend="auto").backend == auto_backend()
    import graphc.targets as backends
    monkeypatch.setitem(sys.modules, "llvmlite.binding", None)       # llvmlite does not load
    monkeypatch.setattr(backends, "_fallback_said", False)
    assert [backends.auto_backend() for _ in range(3)] == ["numpy"] * 3
    said = [r.getMessage() for r in caplog.records if "llvmlite" in r.getMessage()]
    assert len(said) == 1 and "numpy backend" in said[0]                  # said once


def test_epoch_lines_carry_training_accuracy_and_meaningful_timings(tmp_path, capsys):
    code, out, err = cli(capsys, "train", DIGITS_MLP, "--epochs", 3, "--out", tmp_path / "r")
    assert code == 0, err
    line = re.compile(r"^epoch \d: loss \d\.\d{4}, accuracy \d+\.\d{2}%, val loss \d\.\d{4}, "
                      r"val accuracy \d+\.\d{2}%, lr \S+, (\d+ ms|\d+\.\d s) \(([\d,]+) samples/s\)$")
    epochs = [line.match(text) for text in out.splitlines() if text.startswith("epoch")]
    assert len(epochs) == 3 and all(epochs), out
    assert "0 ms" not in [m[1] for m in epochs]
    rows = metrics(tmp_path / "r")
    assert all(0.5 < float(r["accuracy"]) <= 1 and float(r["seconds"]) > 0 for r in rows)


def test_train_needs_a_train_block(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "models/backprop_example.nn", "--out", tmp_path / "r")
    clean_error(code, err)
    assert "model backprop_example has no train block" in err and "hint:" in err
    code, _, err = cli(capsys, "train", "--quiet")
    clean_error(code, err)
    assert "needs a .nn file, an artifact, or --resume RUN" in err


# --- 6. eval and predict -----------------------------------------------------------------------

@pytest.mark.parametrize("split", ["test", "val", "train"])
def test_eval_a_run(baseline, split, capsys):
    run, _ = baseline
    code, out, err = cli(capsys, "eval", run, "--split", split)
    assert code == 0, err
    sizes = {"train": 1079, "val": 359, "test": 359}
    match = re.fullmatch(rf"{split}: loss (\d+\.\d{{4}}), accuracy (\d+\.\d{{2}})% "
                         rf"\(([\d,]+) samples\)\n", out)
    assert match, out
    assert int(match[3].replace(",", "")) == sizes[split]
    if split != "train":
        s = scores(run)[split]
        assert out.startswith(f"{split}: loss {s['loss']:.4f}, accuracy {100 * s['accuracy']:.2f}%")
    else:
        assert float(match[2]) > 80


def test_eval_defaults_to_test_and_reads_artifacts(baseline, capsys):
    run, proc = baseline
    code, out, _ = cli(capsys, "eval", run)
    assert code == 0 and out.startswith(proc.stdout.strip() + " (359 samples)")
    # the run's model folder alone: same split and scaling (fitted again, same seed)
    code, out_art, err = cli(capsys, "eval", run / "trained")
    assert code == 0, err
    assert out_art == out


def test_eval_of_a_missing_target(tmp_path, capsys):
    code, _, err = cli(capsys, "eval", tmp_path / "nope")
    clean_error(code, err)
    assert "no such run or artifact folder" in err


@pytest.fixture(scope="module")
def digits_rows(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    digits = load_digits()
    rows = np.random.default_rng(5).choice(len(digits.target), 40, replace=False)
    path = tmp_path_factory.mktemp("predict") / "x.npy"
    np.save(path, digits.data[rows])                  # raw pixel values 0..16, not scaled
    return path, digits.data[rows], digits.target[rows]


PREDICT_LINE = re.compile(r"^(\d+): (\d)  \((\d: \d\.\d{3}), (\d: \d\.\d{3}), (\d: \d\.\d{3})\)$")


def test_predict_prints_a_class_and_probabilities_per_sample(baseline, digits_rows, tmp_path,
                                                             capsys):
    run, _ = baseline
    path, x, y = digits_rows
    out_file = tmp_path / "pred.npz"
    code, out, err = cli(capsys, "predict", run, "--input", path, "-o", out_file)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == len(y)
    printed = []
    for i, line in enumerate(lines):
        m = PREDICT_LINE.match(line)
        assert m, line
        assert int(m[1]) == i
        assert m[3].startswith(f"{m[2]}:")            # the first probability is the predicted class
        printed.append(int(m[2]))
    printed = np.array(printed)
    assert np.mean(printed == y) >= 0.8
    with np.load(out_file, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["classes", "probabilities"]
        classes, probs = npz["classes"], npz["probabilities"]
    assert probs.shape == (len(y), 10) and np.all(probs >= 0)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(classes, printed) and np.array_equal(probs.argmax(axis=1), classes)
    assert str(out_file) in err

    # inputs scaled already, said with --inputs scaled, give the same predictions
    scaler = Scaler.from_json(json.loads((run / "config.json").read_text())["data"]["scaler"])
    scaled = tmp_path / "scaled.npy"
    np.save(scaled, scaler.apply(x, dtype=np.float32))
    code, out2, err2 = cli(capsys, "predict", run, "--input", scaled, "--inputs", "scaled")
    assert code == 0 and out2 == out and "warning" not in err2
    # said as raw, they are fed as they are, with a warning that they do not look raw
    code, out3, err3 = cli(capsys, "predict", run, "--input", scaled, "--inputs", "raw")
    assert code == 0 and "warning: the inputs lie in" in err3
    code, _, err4 = cli(capsys, "predict", run, "--input", scaled, "--no-scale")
    clean_error(code, err4)
    assert "--no-scale is gone" in err4 and "--inputs scaled" in err4


def test_predict_a_single_sample(baseline, digits_rows, tmp_path, capsys):
    run, _ = baseline
    _, x, _ = digits_rows
    one = tmp_path / "one.npy"
    np.save(one, x[0])                                # a 1-D array of 64 values
    code, out, err = cli(capsys, "predict", run, "--input", one)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and PREDICT_LINE.match(lines[0])
    code, out_all, _ = cli(capsys, "predict", run, "--input", digits_rows[0])
    assert out_all.splitlines()[0] == lines[0]


def test_predict_refuses_samples_of_the_wrong_size(baseline, tmp_path, capsys):
    run, _ = baseline
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 63)))
    code, _, err = cli(capsys, "predict", run, "--input", bad)
    clean_error(code, err)
    assert str(bad) in err and "64" in err


# --- 7. data errors through the command line ---------------------------------------------------

SMALL_NN = """
model small {
    input x: f32[N, 4]
    input y: i64[N]
    logits = x -> linear(3)
    output probs = softmax(logits, axis=1)
    loss = cross_entropy(logits, y)
}
train small {
    data      = DATA
    optimizer = sgd(lr=0.1)
    epochs    = 2
}
"""


def small_model(folder: Path, data: str) -> Path:
    path = folder / "small.nn"
    path.write_text(SMALL_NN.replace("DATA", data))
    return path


def test_missing_npz_names_the_file(tmp_path, capsys):
    source = small_model(tmp_path, 'npz("missing.npz")')
    code, _, err = cli(capsys, "train", source, "--out", tmp_path / "run", "--quiet")
    clean_error(code, err)
    assert f"{tmp_path / 'missing.npz'}: error: no such file" in err
    assert not (tmp_path / "run").exists()


def test_npz_with_the_wrong_feature_count(tmp_path, capsys):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((30, 5)), y=np.zeros(30, dtype=np.int64))
    source = small_model(tmp_path, 'npz("wrong.npz")')
    code, _, err = cli(capsys, "train", source, "--out", tmp_path / "run", "--quiet")
    clean_error(code, err)
    assert "5 values" in err and "f32[N, 4]" in err and "4 values per sample" in err
    assert not (tmp_path / "run").exists()


def test_npz_with_the_wrong_feature_count_names_the_file(tmp_path, capsys):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((30, 5)), y=np.zeros(30, dtype=np.int64))
    source = small_model(tmp_path, 'npz("wrong.npz")')
    code, _, err = cli(capsys, "train", source, "--out", tmp_path / "run", "--quiet")
    clean_error(code, err)
    assert "wrong.npz" in err


def test_csv_with_a_non_numeric_cell(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("a,b,c,d,label\n1,2,3,4,0\n1,2,x3,4,1\n5,6,7,8,2\n")
    source = small_model(tmp_path, 'csv("bad.csv", label="label")')
    code, _, err = cli(capsys, "train", source, "--out", tmp_path / "run", "--quiet")
    clean_error(code, err)
    assert f"{tmp_path / 'bad.csv'}:3:5: error:" in err and "'x3'" in err


def test_mnist_from_an_empty_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, "train", "models/mnist_mlp.nn", "--data-dir", empty,
                       "--out", tmp_path / "run", "--quiet")
    clean_error(code, err)
    assert str(empty) in err
    for name in IDX_NAMES:
        assert name in err
    assert "--data-dir" in err


def test_mnist_with_no_data_folder_at_all(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "models/mnist_mlp.nn", "--out", tmp_path / "run")
    clean_error(code, err)
    assert "GRAPHC_DATA" in err and "--data-dir" in err


def test_mnist_with_a_wrong_magic_number(tmp_path, capsys):
    folder = tmp_path / "mnist"
    folder.mkdir()
    if MNIST_DIR.is_dir() and all((MNIST_DIR / f"{n}.gz").is_file() for n in IDX_NAMES):
        for name in IDX_NAMES[1:]:                # the images are replaced below
            shutil.copy(MNIST_DIR / f"{name}.gz", folder / f"{name}.gz")
    else:                                         # a tiny stand-in with the same layout
        import gzip
        import struct
        for name in IDX_NAMES:
            n = 6 if name.startswith("train") else 4
            if "images" in name:
                data = struct.pack(">iiii", 0x803, n, 28, 28) + bytes(n * 784)
            else:
                data = struct.pack(">ii", 0x801, n) + bytes(n)
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    images = folder / "train-images-idx3-ubyte.gz"
    shutil.copy(folder / "train-labels-idx1-ubyte.gz", images)   # a label file as the images
    code, _, err = cli(capsys, "train", "models/mnist_mlp.nn", "--data-dir", folder,
                       "--out", tmp_path / "run", "--quiet")
    clean_error(code, err)
    assert f"{images}: error: not an IDX image file" in err
    assert "magic number 0x00000801, expected 0x00000803" in err
    assert "swapped" in err


# --- 8. the Python API -------------------------------------------------------------------------

def test_train_step_lowers_the_loss_on_one_batch(digits_batch):
    x, y = digits_batch
    p = graphc.compile_file(REPO / DIGITS_MLP)
    assert p.lr == 2e-3 and p.step == 0 and p.optimizer == "adam"
    before = p.evaluate(x=x, y=y)["loss"]
    losses = [p.train_step(x=x, y=y) for _ in range(15)]
    assert p.step == 15
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert p.evaluate(x=x, y=y)["loss"] < 0.8 * before


def test_loss_and_grads_changes_nothing(digits_batch):
    x, y = digits_batch
    p = graphc.compile_file(REPO / DIGITS_MLP)
    p.train_step(x=x, y=y)                                 # some optimizer state to keep
    params = {k: v.copy() for k, v in p.params.items()}
    state = {k: v.copy() for k, v in p.state.items()}
    loss, grads = p.loss_and_grads(x=x, y=y)
    assert isinstance(loss, float) and math.isfinite(loss)
    assert set(grads) == set(p.params)
    for name, g in grads.items():
        assert g.shape == p.params[name].shape and g.dtype == p.params[name].dtype, name
        assert np.all(np.isfinite(g)) and np.any(g != 0), name
    assert same_params(dict(p.params), params)
    assert state.keys() == p.state.keys()
    assert all(np.array_equal(state[k], p.state[k]) for k in state)
    assert p.step == 1
    # the same step, the same dropout mask: the same loss and gradients again
    loss2, grads2 = p.loss_and_grads(x=x, y=y)
    assert loss2 == loss and all(np.array_equal(grads[k], grads2[k]) for k in grads)
    # and train_step computes that very loss before updating
    assert p.train_step(x=x, y=y) == pytest.approx(loss, rel=1e-6)


def test_gradients_are_those_of_the_training_loss(digits_batch):
    """A central difference of the training loss along the gradient is |g|^2 (dropout fixed by
    the step, so the loss is a deterministic function of the parameters)."""
    x, y = digits_batch
    p = graphc.compile_file(REPO / "models/digits_logreg.nn")
    loss, grads = p.loss_and_grads(x=x, y=y)
    base = {k: v.astype(np.float64) for k, v in p.params.items()}
    norm2 = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())
    eps = 1e-2 / math.sqrt(norm2)

    def loss_at(t):
        for k in base:
            p.params[k] = base[k] + t * grads[k]
        return p.loss_and_grads(x=x, y=y)[0]

    slope = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert slope == pytest.approx(norm2, rel=0.02)


def test_evaluate_scores_a_batch(digits_batch):
    x, y = digits_batch
    p = graphc.compile_file(REPO / DIGITS_MLP)
    s = p.evaluate(x=x, y=y)
    assert set(s) == {"loss", "accuracy"}
    assert s["loss"] > 0 and 0 <= s["accuracy"] <= 1
    probs = p.forward(x=x)["probs"]
    assert s["accuracy"] == pytest.approx(np.mean(probs.argmax(axis=1) == y))


def test_dropout_is_on_in_training_and_off_in_evaluation(digits_batch):
    x, y = digits_batch
    p = graphc.compile_file(REPO / DIGITS_MLP)           # dropout(0.2)
    p.lr = 0.0                                            # steps that leave the parameters alone
    params = {k: v.copy() for k, v in p.params.items()}
    first, second = p.train_step(x=x, y=y), p.train_step(x=x, y=y)
    assert same_params(dict(p.params), params)
    assert first != second                                # another step, another dropout mask
    assert p.loss_and_grads(x=x, y=y)[0] != first
    e1, e2 = p.evaluate(x=x, y=y), p.evaluate(x=x, y=y)
    assert e1 == e2 and e1["loss"] not in (first, second)
    assert np.array_equal(p.forward(x=x)["probs"], p.forward(x=x)["probs"])


def test_without_dropout_the_training_loss_does_not_depend_on_the_step(digits_batch):
    x, y = digits_batch
    p = graphc.compile_file(REPO / "models/digits_logreg.nn")
    p.lr = 0.0
    first, second = p.train_step(x=x, y=y), p.train_step(x=x, y=y)
    assert first == pytest.approx(second, rel=1e-7)


def test_train_step_without_a_train_block_is_a_program_error():
    p = graphc.compile_file(REPO / "models/backprop_example.nn")
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ProgramError, match=r"backprop_example has no training step: the file has "
                                           r"no `train backprop_example \{ \.\.\. \}` block"):
        p.train_step(x=x, t=np.zeros(2, np.float32))
    loss, grads = p.loss_and_grads(x=x, t=np.zeros(2, np.float32))   # still differentiable
    assert set(grads) == {"W", "beta"}
    with pytest.raises(GraphcError, match="has no train block"):
        TrainSettings.of(p)


def test_train_step_without_a_loss_is_a_program_error():
    p = graphc.compile_source("model f { input x: f32[N, 2]\n output y = x * 2.0 }")
    with pytest.raises(ProgramError, match="has no training step: the model has no loss"):
        p.train_step(x=np.zeros((1, 2), np.float32))


def test_train_step_checks_its_inputs(digits_batch):
    x, y = digits_batch
    p = graphc.compile_file(REPO / DIGITS_MLP)
    with pytest.raises(ProgramError, match="needs input 'y'"):
        p.train_step(x=x)
    with pytest.raises(ProgramError, match="input x is f32"):
        p.train_step(x=x[:, :10], y=y)
    assert p.step == 0


# --- 9. every bundled model with a train block -------------------------------------------------

# (models trained by steps on text, such as shakespeare_gpt, are trained in test_text_steps.py)
TRAINABLE = [m for m in MODELS if re.search(r"^train\s+\w+", m.read_text(), re.M)
             and not re.search(r"^\s*steps\s*=", m.read_text(), re.M)]


def test_the_bundled_models_that_train():
    names = {m.stem for m in TRAINABLE}
    assert {"digits_mlp", "digits_logreg", "digits_nesterov", "digits_adagrad", "digits_rmsprop",
            "digits_adamw", "mnist_mlp"} <= names


@pytest.fixture(scope="module")
def mnist_data():
    if not MNIST_DIR.is_dir():
        pytest.skip(f"no MNIST files in {MNIST_DIR}")
    p = graphc.compile_file(REPO / "models/mnist_mlp.nn")
    return p, prepare_data(p, TrainSettings.of(p), data_dir=str(MNIST_DIR))


def test_mnist_prepare_data_shapes_and_scaling(mnist_data):
    p, data = mnist_data
    assert data.features == "x" and data.labels == "y"
    sizes = {"train": 48000, "val": 12000, "test": 10000}     # 20% of the 60,000 for validation
    for split, (x, y) in data.splits.items():
        assert x.shape == (sizes[split], 784) and x.dtype == np.float32, split
        assert y.shape == (sizes[split],) and y.dtype == np.int64, split
        assert x.min() >= 0.0 and x.max() <= 1.0, split    # scale = unit (the default): /255
        assert set(np.unique(y)) == set(range(10)), split
    assert data.scaler.to_json() == {"mode": "unit", "min": 0.0, "max": 255.0}
    assert data.describe()["sizes"] == sizes


@pytest.mark.parametrize("model", TRAINABLE, ids=[m.stem for m in TRAINABLE])
def test_every_model_trains_two_epochs(model, request):
    p = graphc.compile_file(model)
    settings = replace(TrainSettings.of(p), epochs=2)
    if settings.data[0] in ("mnist", "fashion_mnist"):
        # MNIST is slow in full: two epochs of a slice of it, shaped as the model takes it (images
        # for the CNNs). Training batches as in the train block: the augmenter's BLOCK of them and
        # a short one (two blocks, a last batch of 16); to validate and test on, an evaluation
        # chunk and a short one (means weighted by chunk size)
        _, full = request.getfixturevalue("mnist_data")
        shape = tuple(p.train_inputs[full.features].shape[1:])
        sizes = {"train": settings.batch * BLOCK + 16, "val": EVAL_BATCH + 44, "test": EVAL_BATCH + 44}
        subset = {k: (x[:sizes[k]].reshape((-1,) + shape), y[:sizes[k]]) for k, (x, y) in full.splits.items()}
        data = Data(subset, full.scaler, full.features, full.labels, full.source)
    else:
        data = prepare_data(p, settings, base_dir=model.parent)
    trainer = Trainer(p, settings, data)
    result = trainer.fit()
    history = trainer.loop.history
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"], history
    assert all(math.isfinite(row["val_loss"]) for row in history)
    assert math.isfinite(result["test"]["loss"]) and result["test"]["accuracy"] > 0.3
    # the learning rate of each epoch follows the schedule
    schedule = make_schedule(settings.schedule, settings.lr)
    for row in history:
        assert row["lr"] == schedule.lr
        schedule.epoch_end(row["val_loss"])
