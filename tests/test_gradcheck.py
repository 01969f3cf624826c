"""`graphc check --grad`: derived gradients against float64 central differences, as a command."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import LARGE_MODELS

from graphc.cli import main
from graphc.compiler import check_source
from graphc.gradcheck import to_float64
from graphc.ir import OPS
from graphc.ir.node import Graph
from graphc.ir.types import DType

REPO = Path(__file__).resolve().parents[1]
MODELS = [m for m in sorted((REPO / "models").glob("*.nn")) if m.stem not in LARGE_MODELS]  # (conftest)
TANH_NET = """
model t {
    input x: f32[N, 3]
    input y: f32[N, 2]
    param W: f32[3, 2] = normal()
    param b: f32[2] = zeros()
    output f = tanh(x @ W + b)
    loss = mse(f, y)
}
"""


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_every_bundled_models_gradients_check_out(path, capsys):
    # The CNNs' float64 forward passes are costly: two elements per parameter there.
    samples = "2" if "conv(" in path.read_text() else "32"
    assert main(["check", "--grad", str(path), "--samples", samples]) == 0
    out = capsys.readouterr().out
    assert "against central differences (float64" in out and "WRONG" not in out
    checked = check_source(path.read_text(), str(path))
    model = checked.pick(None)
    trained = {n for n, p in model.params.items() if p.role != "stat"}   # not batch norm's stats
    assert set(out.split()) >= trained              # a row for every trained parameter


def test_a_wrong_gradient_rule_is_caught(tmp_path, capsys, monkeypatch):
    model = tmp_path / "t.nn"
    model.write_text(TANH_NET)
    assert main(["check", "--grad", str(model)]) == 0
    capsys.readouterr()
    # 1 - y instead of 1 - y^2: a plausible slip in tanh's derivative.
    wrong = lambda e, n, g, w: [e("mul", g, e("sub", e.const(1.0, n.dtype), n))]  # noqa: E731
    monkeypatch.setitem(OPS, "tanh", replace(OPS["tanh"], grad=wrong))
    assert main(["check", "--grad", str(model)]) == 1
    captured = capsys.readouterr()
    rows = {line.split()[0]: line for line in captured.out.splitlines()[2:]}
    assert rows["W"].endswith("WRONG") and rows["b"].endswith("WRONG")
    assert "the derived gradient of W, b disagrees with finite differences" in captured.err


def test_the_check_runs_in_float64():
    checked = check_source(TANH_NET, "t.nn")
    ir = checked.pick(None)
    graph = to_float64(Graph("t", (("loss", ir.loss),)))
    floats = [n for n in graph.nodes() if n.type.dtype.is_float]
    assert floats and all(n.type.dtype is DType.f64 for n in floats)


def test_a_model_without_a_loss_is_one_clear_error(tmp_path, capsys):
    model = tmp_path / "f.nn"
    model.write_text("model f { input x: f32[N, 2]\n param W: f32[2, 2] = normal()\n output y = x @ W }\n")
    assert main(["check", "--grad", str(model)]) == 1
    err = capsys.readouterr().err
    assert "has no loss to differentiate" in err and "Traceback" not in err
