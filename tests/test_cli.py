"""The command line: every command's happy path, --help everywhere, usage errors exit 2."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

import graphc
from graphc.cli import main


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"graphc {graphc.__version__}"


@pytest.mark.parametrize("command", [[], ["check"], ["build"], ["graph"], ["run"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command + ["--help"])
    assert info.value.code == 0
    assert "usage: graphc" in capsys.readouterr().out


def test_check_prints_the_parameter_table(capsys):
    assert main(["check", "models/mnist_mlp.nn"]) == 0
    out = capsys.readouterr().out
    assert "W1         weight  [784, 256]  f32    200,704  kaiming()" in out
    assert "total: 203,530 parameters in 4 tensors" in out
    assert "optimizer=adam(lr=0.001" in out
    assert out.rstrip().endswith("models/mnist_mlp.nn: ok (1 model)")


def test_graph_text_and_dot(capsys, tmp_path):
    assert main(["graph", "models/backprop_example.nn"]) == 0
    text = capsys.readouterr().out
    assert "matmul(%0, %2)  f32[N, 4]  models/backprop_example.nn:9" in text
    assert "output loss = %8" in text
    out = tmp_path / "g.dot"
    assert main(["graph", "models/mnist_mlp.nn", "--format", "dot", "--lowered", "-o", str(out)]) == 0
    dot = out.read_text()
    assert dot.startswith('digraph "mnist_mlp" {') and dot.rstrip().endswith("}")
    assert "one_hot" in dot and "->" in dot


def test_build_with_verify_and_dump(capsys, tmp_path):
    assert main(["build", "models/mnist_layers.nn", "-o", str(tmp_path / "a"), "--verify",
                 "--dump-after", "decompose"]) == 0
    out = capsys.readouterr().out
    assert "; IR after decompose" in out and "built mnist_layers" in out
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["graph.json", "manifest.json",
                                                                 "params.npz"]


@pytest.mark.parametrize("argv", [["frobnicate"], ["build", "models/mnist_mlp.nn"],
                                  ["build", "models/mnist_mlp.nn", "-o", "x", "--dump-after", "frobnicate"],
                                  ["graph", "models/mnist_mlp.nn", "--format", "png"]])
def test_bad_usage_exits_2(argv, capsys, tmp_path):
    if "-o" in argv:
        argv[argv.index("-o") + 1] = str(tmp_path / "x")
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert "usage: graphc" in capsys.readouterr().err


def test_missing_file_is_a_clean_error(capsys):
    assert main(["check", "models/nope.nn"]) == 1
    assert capsys.readouterr().err.strip() == "models/nope.nn: error: no such file"


def test_model_choice(capsys, tmp_path):
    src = tmp_path / "two.nn"
    src.write_text("model a { input x: f32[N]\n output x }\nmodel b { input x: f32[N]\n output x }\n")
    assert main(["build", str(src), "-o", str(tmp_path / "o")]) == 1
    assert "holds 2 models (a, b); choose one" in capsys.readouterr().err
    assert main(["build", str(src), "-o", str(tmp_path / "o"), "--model", "b"]) == 0


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "graphc", "check", "models/backprop_example.nn"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^  beta +weight +\[4\] +f32 +4 +normal\(mean=0.0, std=0.1\)$", proc.stdout, re.M)


@pytest.mark.parametrize("debug", [False, True])
def test_libraries_log_only_errors_unless_debug(capsys, debug):
    """Dask's cluster chatter (INFO, and warnings like 'Lost all workers') reaches stderr only
    with --debug; graphc's own warnings always do."""
    import logging

    from graphc.cli_common import configure_logging
    configure_logging(debug)
    try:
        logging.getLogger("distributed.scheduler").info("State start")
        logging.getLogger("distributed.nanny").warning("Lost all workers")
        logging.getLogger("distributed.core").error("a real failure")
        logging.getLogger("graphc.search").warning("trial 3 failed twice")
        err = capsys.readouterr().err
        assert "graphc: a real failure" in err and "graphc: trial 3 failed twice" in err
        assert ("State start" in err) == debug and ("Lost all workers" in err) == debug
    finally:
        configure_logging(False)
