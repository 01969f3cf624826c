"""Lints that teach: each rule fires where the course's mistake is written (file:line:col, the
line, a caret and a one-line why), stays quiet on the sound version, and --Werror turns them into
errors. Every bundled model is clean."""
from __future__ import annotations

from pathlib import Path

import pytest

from graphc.cli import main
from graphc.compiler import check_source
from graphc.errors import GraphcError
from graphc.lints import lint

REPO = Path(__file__).resolve().parents[1]
MODELS = sorted((REPO / "models").glob("*.nn"))

TRAIN = "train m { optimizer = adam(lr=1e-3)\n seed = 1 }\n"


def _lints(model: str, train: str = TRAIN) -> list[str]:
    return [d.render() for d in lint(check_source(model + train, "m.nn"))]


def _one(model: str, train: str = TRAIN) -> str:
    found = _lints(model, train)
    assert len(found) == 1, found
    return found[0]


MLP = """model m {{
    input x: f32[N, 4]
    input y: i64[N]
    param W1: f32[4, 8] = {init}
    param b1: f32[8] = zeros()
    param W2: f32[8, 3] = kaiming()
    logits = relu(x @ W1 + b1) @ W2
    output p = log_softmax(logits, axis=1)
    loss = nll(p, y){extra}
}}
"""


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_bundled_models_are_clean(path):
    assert lint(check_source(path.read_text(), str(path))) == []


def test_a_constant_hidden_weight_is_flagged_with_its_line_and_why():
    text = _one(MLP.format(init="zeros()", extra=""))
    assert text.startswith("m.nn:4:5: warning: weight W1 starts as a constant (zeros)")
    assert "   4 |     param W1: f32[4, 8] = zeros()" in text and "^" in text
    assert "hint: every hidden unit of its layer then computes the same thing" in text
    assert _lints(MLP.format(init="kaiming()", extra="")) == []


def test_a_zero_last_layer_is_fine():
    logreg = """model m { input x: f32[N, 4]
        input y: i64[N]
        param W: f32[4, 3] = zeros()
        output p = log_softmax(x @ W, axis=1)
        loss = nll(p, y) }
"""
    assert _lints(logreg) == []


def test_a_regularized_bias_is_flagged():
    text = _one(MLP.format(init="kaiming()", extra=" + 1e-4 * l2(W1, b1)"))
    assert "warning: l2 penalizes the bias b1" in text
    assert _lints(MLP.format(init="kaiming()", extra=" + 1e-4 * l2(W1, W2)")) == []


def test_log_of_softmax_written_out_is_flagged():
    src = MLP.format(init="kaiming()", extra="").replace("log_softmax(logits, axis=1)",
                                                         "log(softmax(logits, axis=1))")
    assert "warning: log(softmax(x)) written out" in _one(src)


def test_softmax_before_a_loss_that_wants_logits_is_flagged():
    src = """model m { input x: f32[N, 4]
        input y: i64[N]
        param W: f32[4, 3] = kaiming()
        output s = softmax(x @ W, axis=1)
        loss = cross_entropy(s, y) }
"""
    assert "cross_entropy is given softmax(...), not logits" in _one(src)


def test_a_deep_stack_of_sigmoids_is_advice():
    src = ("model m {\n    input x: f32[N, 8]\n    input y: f32[N, 8]\n"
           + "\n".join(f"    h{i} = {'x' if i == 1 else f'h{i - 1}'} -> linear(8) -> sigmoid"
                       for i in range(1, 6))
           + "\n    output h5\n    loss = mse(h5, y)\n}\n")
    assert "advice: 5 sigmoid/tanh layers in a row" in _one(src)
    four = src.replace("    h5 = h4 -> linear(8) -> sigmoid", "    h5 = h4 -> linear(8) -> relu")
    assert _lints(four) == []


def test_dropout_right_before_a_regression_output_is_advice():
    src = """model m { input x: f32[N, 4]
        input y: f32[N, 1]
        param W: f32[4, 1] = kaiming()
        output f = dropout(x @ W, 0.5)
        loss = mse(f, y) }
"""
    assert "advice: dropout right before the output f of a regression" in _one(src)


def test_train_block_advice():
    model = MLP.format(init="kaiming()", extra="")
    assert "warning: train m sets no seed" in _one(model, "train m { optimizer = adam(lr=1e-3) }\n")
    assert "advice: adam with lr=0.1" in _one(model, "train m { optimizer = adam(lr=0.1)\n seed = 1 }\n")
    deep = MLP.format(init="kaiming()", extra="").replace(
        "logits = relu(x @ W1 + b1) @ W2", "logits = relu(relu(x @ W1 + b1) @ W3) @ W2").replace(
        "param W2:", "param W3: f32[8, 8] = kaiming()\n    param W2:")
    assert "advice: sgd without momentum on a net of 3 weight matrices" in _one(
        deep, "train m { optimizer = sgd(lr=0.1)\n seed = 1 }\n")
    assert _lints(deep, "train m { optimizer = sgd(lr=0.1, momentum=0.9)\n seed = 1 }\n") == []


def test_batch_norm_with_batches_of_one_is_advice():
    model = MLP.format(init="kaiming()", extra="").replace("relu(x @ W1 + b1)",
                                                           "relu(x @ W1 + b1 -> batchnorm)")
    found = _one(model, "train m { optimizer = adam(lr=1e-3)\n batch = 1\n seed = 1 }\n")
    assert "m.nn:12:2: advice: batch = 1 with batch norm (line 7)" in found, found
    assert "^" in found and "layernorm()" in found
    assert _lints(model, "train m { optimizer = adam(lr=1e-3)\n batch = 32\n seed = 1 }\n") == []


def test_cli_prints_lints_and_werror_makes_them_errors(tmp_path, capsys):
    f = tmp_path / "m.nn"
    f.write_text(MLP.format(init="zeros()", extra="") + "train m { optimizer = adam(lr=1e-3) }\n")
    for command in (["check"], ["build", "-o", str(tmp_path / "out")]):
        assert main([*command, str(f)]) == 0
        err = capsys.readouterr().err
        assert "warning: weight W1 starts as a constant" in err and "warning: train m sets no seed" in err
        assert main([*command, str(f), "--Werror"]) == 1
        err = capsys.readouterr().err
        assert "error: weight W1 starts as a constant" in err and "Traceback" not in err
    # A cached build replays its warnings.
    assert main(["build", str(f), "-o", str(tmp_path / "again")]) == 0
    assert "warning: weight W1 starts as a constant" in capsys.readouterr().err


NO_LOSS = """model k {
    input x: f32[N, 64]
    param W: f32[64, 10] = kaiming()
    output x @ W
}
train k { optimizer = adam(lr=1e-3)
    seed = 1 }
"""


def test_a_train_block_for_a_model_without_a_loss_is_located(tmp_path, capsys):
    f = tmp_path / "k.nn"
    f.write_text(NO_LOSS)
    for command in ("check", "train"):
        assert main([command, str(f)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"{f}:6:7: error: train k: model k has no loss, so there is "
                              f"nothing to train"), err
        assert "hint: add `loss = ...` to model k (line 1)" in err and "Traceback" not in err


def test_a_train_block_without_data_says_it_trains_on_the_digits(tmp_path, capsys):
    f = tmp_path / "m.nn"
    f.write_text("model m {\n    input x: f32[N, 784]\n    input y: i64[N]\n"
                 "    param W: f32[784, 10] = zeros()\n    logits = x @ W\n    output logits\n"
                 "    loss = cross_entropy(logits, y)\n}\ntrain m { optimizer = adam(lr=1e-3)\n"
                 "    seed = 1 }\n")
    assert main(["train", str(f), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: digits samples have 64 values but input x of the model is f32[N, 784]" in err
    assert "hint: a train block that names no `data` trains on the digits (8x8 images)" in err


def test_mse_against_integer_labels_hints_one_hot(capsys):
    source = ("model m {\n    input x: f32[N, 4]\n    input y: i64[N]\n"
              "    param W: f32[4, 3] = zeros()\n    logits = x @ W\n    output logits\n"
              "    loss = mse(logits, y)\n}\n")
    with pytest.raises(GraphcError) as err:
        check_source(source, "m.nn")
    text = str(err.value)
    assert "m.nn:7:12: error: mse: the target is integer class labels: y is i64[N]" in text
    assert "hint: compare with one-hot rows, mse(logits, one_hot(y, 3)), or use " \
           "cross_entropy(logits, y) on scores" in text
    check_source(source.replace("mse(logits, y)", "mse(logits, one_hot(y, 3))"), "m.nn")
