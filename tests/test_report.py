"""Graph pictures (`graphc graph --format dot|png|svg`), weight and gradient norms
(runtime/norms.py, `train --track-norms`) and reports (`graphc report`) of runs and searches."""
from __future__ import annotations

import inspect
import json
import re
import shutil
import struct

import numpy as np
import pytest
from conftest import REPO

import graphc
from graphc.cli import main
from graphc.runtime.norms import NormRecorder, gradient_warnings, read_norms
from graphc.runtime.train import Trainer

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's `dot` is not installed (apt install graphviz)")
needs_matplotlib = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("matplotlib"),
    reason="matplotlib is not installed (pip install -e '.[report]')")
hook_in = "norms" in inspect.signature(Trainer.__init__).parameters


@pytest.fixture(autouse=True)
def at_repo(monkeypatch, repo):
    monkeypatch.chdir(repo)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# --- graph pictures ------------------------------------------------------------------------------

def test_dot_colours_nodes_by_line_frames_parts_and_kernels(tmp_path):
    out = tmp_path / "step.dot"
    assert main(["graph", "models/mnist_mlp.nn", "--train-step", "--format", "dot", "-o", str(out)]) == 0
    dot = out.read_text()
    assert dot.startswith('digraph "mnist_mlp.train_step" {')
    for part in ("forward", "gradient", "update"):
        assert f"subgraph cluster_{part} {{" in dot
    assert "subgraph cluster_k" in dot and "fused kernel" in dot          # kernels and legend
    assert 'label="[N, 256]"' in dot and 'label="bool[N, 256]"' in dot     # shapes on edges
    # The legend quotes each line; nodes of line 11 (h = relu(...)) share its colour.
    assert "mnist_mlp.nn:11</TD>" in dot and "relu(x @ W1 + b1)" in dot
    relu = next(line for line in dot.splitlines() if '"h = relu"' in line)
    colour = relu.split('fillcolor="')[1].split('"')[0]
    assert f'BGCOLOR="{colour}" ALIGN="RIGHT">mnist_mlp.nn:11<' in dot
    # Scalar constants are folded into their users' labels, not drawn as nodes.
    assert 'label="const"' not in dot and "mul(0.0001, ·)" in dot
    plain = tmp_path / "plain.dot"
    assert main(["graph", "models/mnist_mlp.nn", "--train-step", "--no-kernels", "--format", "dot",
                 "-o", str(plain)]) == 0
    assert "subgraph cluster_k" not in plain.read_text()


@needs_dot
def test_png_and_svg_pictures(tmp_path):
    png, svg = tmp_path / "step.png", tmp_path / "fwd.svg"
    assert main(["graph", "models/mnist_mlp.nn", "--train-step", "--format", "png", "-o", str(png)]) == 0
    width, height = png_size(png)
    assert width > 1500 and height > 1000 and png.stat().st_size > 100_000
    assert main(["graph", "models/mnist_mlp.nn", "--format", "svg", "-o", str(svg)]) == 0
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    for label in ("param W1", "h = relu", "logp = log_softmax axis=1", "loss = add", "[N, 784]"):
        assert label in text, label


def test_missing_dot_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))          # nothing to run here, dot included
    out = tmp_path / "g.png"
    assert main(["graph", "models/mnist_mlp.nn", "--format", "png", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "needs the `dot` program of Graphviz" in err and "install Graphviz" in err
    assert "Traceback" not in err and not out.exists()


# --- norms ---------------------------------------------------------------------------------------

def digits_batch(n: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 64)).astype(np.float32),
            "y": rng.integers(0, 10, n).astype(np.int64)}


def test_norm_recorder_records_every_k_steps_and_changes_nothing(tmp_path):
    tracked = graphc.compile_file("models/digits_mlp.nn")
    plain = graphc.compile_file("models/digits_mlp.nn")
    batch = digits_batch()
    recorder = NormRecorder(tmp_path / "norms.jsonl", every=2)
    first_grads = tracked.loss_and_grads(**batch)[1]
    initial = {k: v.copy() for k, v in tracked.params.items()}
    for _ in range(5):
        recorder.observe(tracked, batch, epoch=1)
        tracked.train_step(**batch)
        plain.train_step(**batch)
    for name in plain.params:       # the extra forward and backward passes leave no trace
        assert np.array_equal(tracked.params[name], plain.params[name]), name
    rows = read_norms(tmp_path / "norms.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert set(rows[0]["weights"]) == set(tracked.params) == set(rows[0]["grads"])
    for name in tracked.params:
        assert rows[0]["weights"][name] == pytest.approx(np.linalg.norm(initial[name]), rel=1e-6)
        assert rows[0]["grads"][name] == pytest.approx(np.linalg.norm(first_grads[name]), rel=1e-6)
    assert rows[0]["lr"] == tracked.lr and rows[0]["epoch"] == 1

    # A resumed run (here: at step 2) drops what it will record again, then carries on.
    again = graphc.compile_file("models/digits_mlp.nn")
    again.train_step(**batch)
    again.train_step(**batch)
    NormRecorder(tmp_path / "norms.jsonl", every=2).observe(again, batch, epoch=1)
    assert [r["step"] for r in read_norms(tmp_path / "norms.jsonl")] == [0, 2]


def test_gradient_warning_rule():
    def row(step, **grads):
        return {"step": step, "epoch": 1, "grads": grads}
    healthy = [row(0, W1=0.5, b1=0.1, W2=2.0), row(10, W1=0.3, b1=0.05, W2=1.0)]
    assert gradient_warnings(healthy, ["W1", "W2"]) == []
    found = gradient_warnings([row(0, W1=1e-9, W2=1.0), row(10, W1=1e-9, W2=5e3),
                               row(20, W1=float("nan"), W2=1.0)], ["W1", "W2"])
    kinds = {(w["kind"], w["param"]): w for w in found}
    assert kinds[("vanishing", "W1")]["step"] == 0 and kinds[("vanishing", "W1")]["steps"] == 2
    assert kinds[("exploding", "W2")]["step"] == 10
    assert kinds[("exploding", "W1")]["step"] == 20          # not finite
    assert kinds[("imbalance", "W1/W2")]["value"] > 1e4


# --- reports -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    args = ["train", str(REPO / "models/digits_mlp.nn"), "--epochs", "2", "--out", str(run),
            "--quiet"]
    if hook_in:
        args += ["--track-norms", "5"]
    assert main(args) == 0
    return run


@needs_matplotlib
def test_report_of_a_run(digits_run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(digits_run), "-o", str(out)]) == 0
    assert f"wrote {out / 'index.html'}" in capsys.readouterr().out
    for name in ("curves.png", "lr.png"):
        width, height = png_size(out / name)
        assert width >= 600 and height >= 250 and (out / name).stat().st_size > 15_000, name
    page = (out / "index.html").read_text()
    assert '<img src="curves.png"' in page and '<img src="lr.png"' in page
    assert "test score" in page and "adam(lr=0.002" in page
    assert page.count("<tr>") >= 3                            # header and one row per epoch
    if not hook_in:
        assert "train with --track-norms" in page


@needs_matplotlib
def test_report_plots_norms_and_warns(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    names = ["logits.linear.W", "logits.linear.b", "logits.linear_2.W", "logits.linear_2.b"]
    with (run / "norms.jsonl").open("w") as f:   # as --track-norms writes it, gradients vanishing
        for step in range(0, 60, 5):
            g = 10.0 ** (-step / 6)
            f.write(json.dumps({"step": step, "epoch": 1 + step // 34, "epoch_start": 34 * (step // 34),
                                "lr": 2e-3, "loss": 1.0,
                                "weights": dict.fromkeys(names, 3.0),
                                "grads": {n: g if n.endswith("linear.W") else 0.5 for n in names}}) + "\n")
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert ("warning: step 45 (epoch 2): gradient norm of logits.linear.W is 3.16e-08 (below "
            "1e-07): vanishing gradients (and in 2 later records)") in out
    assert "warning: step 30 (epoch 1): gradient norms of logits.linear.W (1e-05) and " \
           "logits.linear_2.W (0.5) differ by more than 10000x" in out    # first against last
    width, _ = png_size(run / "report" / "norms.png")
    assert width > 1000 and (run / "report" / "norms.png").stat().st_size > 30_000
    page = (run / "report" / "index.html").read_text()
    assert '<img src="norms.png"' in page and 'class="warn"' in page and "vanishing" in page


@pytest.mark.skipif(not hook_in, reason="runtime/train.py's Trainer has no `norms` hook yet")
def test_train_track_norms_writes_norms(digits_run):
    rows = read_norms(digits_run / "norms.jsonl")
    steps_per_epoch = 34                                      # 1,079 samples in batches of 32
    assert [r["step"] for r in rows] == list(range(0, 2 * steps_per_epoch, 5))
    assert rows[-1]["epoch"] == 2 and rows[-1]["epoch_start"] == steps_per_epoch
    assert json.loads((digits_run / "config.json").read_text())["track_norms"] == 5


def write_search(folder, flat: bool = False) -> None:
    """A search folder as `graphc search --out` writes it (or, flat, rows without `params`)."""
    folder.mkdir()
    space = {"lr": {"kind": "loguniform", "low": 1e-4, "high": 1e-1},
             "batch": {"kind": "choice", "values": [16, 32, 64]}}
    if not flat:
        (folder / "search.json").write_text(json.dumps(
            {"model": "digits_mlp", "config": {"space": space, "metric": "val_loss"}}))
    rng = np.random.default_rng(1)
    with (folder / "results.jsonl").open("w") as f:
        for i in range(8):
            lr, batch = float(10 ** rng.uniform(-4, -1)), int(rng.choice([16, 32, 64]))
            values = {"lr": lr, "batch": batch}
            metrics = {"val_loss": abs(np.log10(lr) + 2.5) / 3 + 0.1, "val_accuracy": 0.9}
            row = {"trial": f"r0-t{i}", "round": 1, "epochs": 3, "status": "ok", **metrics}
            row.update(values if flat else {"params": values})
            f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"trial": "r0-t8", "round": 1, "epochs": 3, "status": "failed",
                            "params": {"lr": 0.5, "batch": 16}, "error": "loss is nan"}) + "\n")


@needs_matplotlib
@pytest.mark.parametrize("flat", [False, True])
def test_report_of_a_search(tmp_path, capsys, flat):
    folder = tmp_path / "search"
    write_search(folder, flat)
    assert main(["report", str(folder)]) == 0
    capsys.readouterr()
    out = folder / "report"
    width, height = png_size(out / "search_val_loss.png")
    assert width > 800 and height > 300 and (out / "search_val_loss.png").stat().st_size > 20_000
    page = (out / "index.html").read_text()
    assert "val_loss against each searched value" in page or "val_loss of every" in page
    assert "Log axes: lr." in page                     # log-uniform (or spanning 3 decades)
    assert page.count("<tr><td>") == 8                 # finished trials, ranked
    if not flat:
        assert "1 failed" in page and "loguniform(0.0001, 0.1)" in page


def test_report_refuses_other_folders(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "neither a run folder" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "no such folder" in capsys.readouterr().err


@needs_matplotlib
def test_a_search_report_has_one_notion_of_best(tmp_path, capsys):
    """The trial with the best validation accuracy is not the search's best when the search
    ranks by validation loss: the star on every plot is the search metric's best, as in the table
    and best.nn; accuracies are percentages in the table as in the plots."""
    folder = tmp_path / "search"
    write_search(folder)
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    by_loss = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["val_loss"])
    worst = max((r for r in rows if r["status"] == "ok"), key=lambda r: r["val_loss"])
    worst["val_accuracy"] = 0.99                          # the most accurate, the worst loss
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(folder)]) == 0
    capsys.readouterr()
    page = (folder / "report" / "index.html").read_text()
    stars = re.findall(r"best trial by val_loss \(trial ([^:]+):", page)
    assert stars == [by_loss["trial"]] * 2, stars          # both plots, the same trial
    assert "99.00%" in page and "90.00%" in page and "0.99<" not in page


@needs_matplotlib
def test_run_curves_mark_the_best_epoch_and_the_early_stop(digits_run, tmp_path, capsys):
    scores = json.loads((digits_run / "scores.json").read_text())
    out = tmp_path / "rep"
    assert main(["report", str(digits_run), "-o", str(out)]) == 0
    capsys.readouterr()
    page = (out / "index.html").read_text()
    assert f"The dashed line marks the best epoch, {scores['best_epoch']}" in page
    assert "early stopping ended" not in page
    stopped = tmp_path / "stopped"
    shutil.copytree(digits_run, stopped)
    (stopped / "scores.json").write_text(json.dumps({**scores, "stopped_early": True,
                                                     "best_epoch": 1, "epochs": 2}))
    assert main(["report", str(stopped), "-o", str(tmp_path / "rep2")]) == 0
    page = (tmp_path / "rep2" / "index.html").read_text()
    assert "best epoch, 1 " in page and "where early stopping ended it, after epoch 2" in page
    assert "%</td>" in page                                # accuracies as percentages
