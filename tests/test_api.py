"""The Python API: Program.fit on in-memory arrays (the same loop as `graphc train`, so the same
result and history for the same seed), Program.predict, Program.summary and graphc.load_run."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

import graphc
from graphc.errors import GraphcError
from graphc.runtime.data import load_dataset, split
from graphc.runtime.program import ProgramError
from graphc.runtime.runs import METRIC_COLUMNS
from graphc.runtime.train import evaluate_arrays
from graphc.targets import auto_backend

EPOCHS = 3
TIMING = ("seconds", "samples_per_s")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("api") / "run"
    env = {k: v for k, v in os.environ.items() if k != "GRAPHC_DATA"}
    proc = subprocess.run([sys.executable, "-m", "graphc", "train", "models/digits_mlp.nn",
                           "--epochs", str(EPOCHS), "--out", str(run), "--quiet"], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture(scope="module")
def digits_splits() -> dict:
    """The raw digits, split as `graphc train` splits them with the train block's seed (0)."""
    return split(load_dataset(("digits", {})), 0.2, 0.2, 0)


@pytest.fixture(scope="module")
def fitted(digits_splits):
    # backend None: as graphc train, where the train block says (auto: llvm where it loads)
    program = graphc.compile_file(REPO / "models/digits_mlp.nn", backend=None)
    rows = []
    history = program.fit(*digits_splits["train"], validation=digits_splits["val"],
                          epochs=EPOCHS, callbacks=[rows.append])
    return program, history, rows


def test_fit_reaches_what_graphc_train_reaches(fitted, digits_run, digits_splits):
    program, history, rows = fitted
    with open(digits_run / "metrics.csv", newline="") as f:
        saved = list(csv.DictReader(f))
    assert len(history) == EPOCHS and history.columns == METRIC_COLUMNS
    for column in METRIC_COLUMNS:
        if column not in TIMING:     # the same numbers as metrics.csv writes them
            assert [str(v) for v in history[column]] == [r[column] for r in saved], column
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == history["loss"][-1]
    scores = json.loads((digits_run / "scores.json").read_text())
    assert history.scores["val"] == scores["val"]
    # after fit the program holds its scaling: it scores the raw test split as training did
    x, y = digits_splits["test"]
    assert evaluate_arrays(program, x, y, "x", "y") == pytest.approx(scores["test"], rel=1e-6)
    trained = graphc.load_artifact(digits_run / "trained")
    assert all(np.array_equal(program.params[k], trained.params[k]) for k in trained.params)


def test_fit_holds_out_a_fraction_and_takes_keras_callbacks(digits_splits):
    program = graphc.compile_file(REPO / "models/digits_mlp.nn")
    ends = []

    class Recorder:
        def on_epoch_end(self, epoch, logs):
            ends.append((epoch, logs["val_loss"]))

    x, y = digits_splits["train"]
    history = program.fit(x, y, epochs=1, batch=64, validation=0.25, callbacks=[Recorder()])
    assert ends == [(0, history["val_loss"][0])]
    assert set(history.history) == set(METRIC_COLUMNS)
    with pytest.raises(ProgramError, match="validation fraction"):
        program.fit(x, y, epochs=1, validation=1.5)
    with pytest.raises(KeyError, match="columns"):
        history["val_recall"]


def test_predict_after_fit_takes_raw_samples(fitted, digits_splits):
    program, _, _ = fitted
    x, y = digits_splits["test"]
    probs = program.predict(x)
    assert probs.shape == (len(y), 10) and np.mean(probs.argmax(axis=1) == y) > 0.9
    assert program.predict(x[0]).shape == (10,)          # one sample, no batch axis
    assert np.allclose(program.predict(x, batch=5), probs, rtol=1e-5, atol=1e-7)
    with pytest.raises(ProgramError, match="64 values each"):
        program.predict(np.zeros((2, 63)))


def test_summary_is_the_table_graphc_check_prints(capsys):
    from graphc.cli import main
    program = graphc.compile_file(REPO / "models/digits_mlp.nn")
    assert main(["check", str(REPO / "models/digits_mlp.nn")]) == 0
    printed = capsys.readouterr().out
    assert program.summary() in printed
    assert "logits.linear.W    weight  [64, 256]  f32    16,384  kaiming()" in program.summary()


def test_load_run_gives_the_trained_program(digits_run, digits_splits):
    program = graphc.load_run(digits_run, backend="numpy")
    trained = graphc.load_artifact(digits_run / "trained")
    x, _ = digits_splits["test"]
    assert program.preprocessing is not None
    assert np.array_equal(program.predict(x), trained.predict(x))
    assert graphc.load_run(digits_run).backend == auto_backend()     # the train block's: auto
    assert "x#mean" in program.summary()
    with pytest.raises(GraphcError, match="not a graphc run folder"):
        graphc.load_run(digits_run / "trained")


def test_fit_checks_its_overrides_and_its_validation_pair():
    from sklearn.datasets import load_digits
    digits = load_digits()
    program = graphc.compile_file("models/digits_mlp.nn")
    x, y = digits.data[:200], digits.target[:200]
    for bad, said in (({"lr": float("nan")}, "learning rate must be a finite number > 0"),
                      ({"seed": -1}, "seed must be an integer of at least 0"),
                      ({"batch": 0}, "batch must be an integer of at least 1")):
        with pytest.raises(GraphcError, match=said):
            program.fit(x, y, epochs=1, **bad)
    with pytest.raises(ProgramError, match="validation holds 0 samples"):
        program.fit(x, y, epochs=1, validation=(x[:0], y[:0]))
