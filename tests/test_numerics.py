"""The training loop's numerics checks: --check-numerics names the .nn line whose operation first
made a non-finite value (or the batch that already held one), and a finite loss that runs away
is reported with the learning rate and schedule."""
from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc.cli import main
from graphc.errors import GraphcError
from graphc.runtime.numerics import Divergence, Snapshot, first_non_finite, locate_non_finite

ADAMW = "models/digits_adamw.nn"
LOG_MODEL = """model m {
    input x: f32[N, 3]
    input y: f32[N, 1]
    param W: f32[3, 1] = ones()
    h = x @ W
    output p = log(h)
    loss = mean((p - y) * (p - y))
}
train m { optimizer = sgd(lr=0.1)
    seed = 1 }
"""


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_check_numerics_names_the_line_that_first_made_an_infinity(tmp_path, capsys, backend):
    argv = ["train", ADAMW, "--lr", "1e6", "--epochs", "1", "--quiet", "--backend", backend]
    with np.errstate(all="ignore"):         # the step overflows on purpose
        assert main(argv + ["--out", str(tmp_path / "plain")]) == 1
    plain = capsys.readouterr().err
    assert "error: epoch 1, step 5: the loss is nan" in plain and "--check-numerics" in plain
    with np.errstate(all="ignore"):
        assert main(argv + ["--out", str(tmp_path / "checked"), "--check-numerics"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{ADAMW}:7:58: error: epoch 1, step 5: the first non-finite value "
                          f"comes from matmul"), err
    assert "from finite operands" in err and "Traceback" not in err
    assert "   7 |     logits = x -> linear(128)" in err and "^~~~~~~~~~" in err
    assert "hint: the learning rate is 1e+06" in err


def test_the_node_found_is_the_first_whose_operands_were_finite(tmp_path):
    source = tmp_path / "m.nn"
    source.write_text(LOG_MODEL)
    program = graphc.compile_file(source)
    batch = {"x": np.array([[1, 1, 1], [-1, -1, -2]], np.float32), "y": np.zeros((2, 1), np.float32)}
    with np.errstate(all="ignore"):
        loss = program.train_step(**batch)
    assert np.isnan(loss)
    program = graphc.compile_file(source)
    snapshot = Snapshot.of(program)
    values = program.step_values(batch, snapshot.params, snapshot.state, 0, 0.1)
    node, value, operands = first_non_finite(program.graphs["train_step"], values)
    assert node.op == "log" and node.loc.line == 6 and np.isnan(value).sum() == 1
    assert all(np.isfinite(o).all() for o in operands)
    err = locate_non_finite(program, snapshot, batch, "epoch 1, step 1")
    text = str(err)
    assert text.startswith(f"{source}:6:") and "comes from log in this line" in text
    assert "1 of 2 values are NaN" in text and "hint: log of 0 or of a negative value" in text
    assert "   6 |     output p = log(h)" in text


def test_a_batch_that_already_holds_a_nan_is_blamed_not_the_model(tmp_path):
    source = tmp_path / "m.nn"
    source.write_text(LOG_MODEL)
    program = graphc.compile_file(source)
    batch = {"x": np.array([[1, np.nan, 1]], np.float32), "y": np.zeros((1, 1), np.float32)}
    err = locate_non_finite(program, Snapshot.of(program), batch, "epoch 2, step 3")
    assert isinstance(err, GraphcError)
    assert str(err).startswith("error: epoch 2, step 3: the batch's x already holds 1 non-finite "
                               "value, before the model computed anything")


def test_a_finite_loss_that_runs_away_is_reported_once(tmp_path, capsys):
    assert main(["train", "models/digits_mlp.nn", "--lr", "1e6", "--epochs", "2", "--quiet",
                 "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the training loss is diverging: epoch 1's mean loss") == 1, err
    assert "times the first step's" in err and "learning rate at 1e+06 (schedule" in err
    assert "hint: try a smaller --lr" in err


def test_divergence_needs_a_loss_far_beyond_its_start():
    watch = Divergence()
    watch.observe(2.3)
    watch.observe(500.0)                       # only the first step is the start
    assert watch.check(2.0, 1, 0.1, "constant") is None
    assert watch.check(22.0, 2, 0.1, "constant") is None          # under 10x
    message = watch.check(24.0, 3, 0.1, "constant")
    assert message and "epoch 3's mean loss 24" in message
    assert watch.check(1e9, 4, 0.1, "constant") is None           # said once
    tiny = Divergence()
    tiny.observe(1e-4)
    assert tiny.check(5e-3, 1, 0.1, "constant") is None           # 50x, but still small


def test_train_help_says_how_to_turn_the_check_on(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--check-numerics" in capsys.readouterr().out
