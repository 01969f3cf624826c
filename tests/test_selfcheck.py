"""`graphc check --backends`: every bundled model's forward graph, gradients and train steps agree
with the reference evaluator on numpy and llvm; a deliberately broken lowering fails, naming the
graph and the difference; cuda runs on the emulated device, and is a clear error where it cannot run."""
from __future__ import annotations

import re

import pytest
from conftest import MODELS, REPO
from cuda_emulator import CXX
from emulated_device import emulated_pycuda, gpu_problem

from graphc.cli import main
from graphc.ir.types import DType
from graphc.selfcheck import TOLERANCES, compare, parse_backends

pytest.importorskip("llvmlite", reason="the llvm backend generates its kernels with llvmlite")


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)


ROW = re.compile(r"^  (\w+) +(forward|loss_and_grads|train_step \d) +(\S+) +(\S+) +(ok|FAILED) +(.+)$",
                 re.M)


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_every_bundled_model_passes_on_numpy_and_llvm(path, capsys):
    assert main(["check", str(path.relative_to(REPO)), "--backends", "numpy,llvm"]) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert {(b, g) for b, g, *_ in rows} >= {(b, g) for b in ("numpy", "llvm")
                                             for g in ("forward", "loss_and_grads")}
    assert all(status == "ok" for *_, status, _ in rows) and "within tolerance" in out
    # The numpy backend computes what the reference evaluator does, bit for bit.
    assert all(float(diff) == 0.0 for b, _, diff, *_ in rows if b == "numpy")


def test_a_broken_lowering_fails_naming_the_graph_and_the_difference(monkeypatch, tmp_path,
                                                                     capsys):
    from graphc.backends.llvm import lowering
    # A cache of its own: object code from the intact table would be reused otherwise.
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    exp = lowering.LOWER["exp"]

    def exp_of_101_x(f, args, dts, attrs, out):      # exp(1.01 x): off by 1% of x in the exponent
        t = lowering.IR_TYPE[out]
        return exp(f, [f.emit(f"fmul {t} {args[0]}, {lowering.const(1.01, out)}")], dts, attrs, out)
    monkeypatch.setitem(lowering.LOWER, "exp", exp_of_101_x)
    assert main(["check", "models/digits_logreg.nn", "--backends", "numpy,llvm"]) == 1
    captured = capsys.readouterr()
    assert re.search(r"  numpy +forward +0 +1e-04 +ok", captured.out)
    assert re.search(r"  llvm +forward +\S+ +1e-04 +FAILED +probs", captured.out)
    assert re.search(r"  llvm +train_step 3 +\S+ +1e-04 +FAILED", captured.out)
    assert re.search(r"error: models/digits_logreg.nn: forward on the llvm backend differs from "
                     r"the reference evaluator by [0-9.]+(e[+-]\d+)? in `probs` \(tolerance 1e-04\)",
                     captured.err)
    assert "within tolerance" not in captured.out


@pytest.mark.skipif(CXX is None, reason="the CUDA emulator compiles with g++")
def test_cuda_on_the_emulated_device(capsys):
    with emulated_pycuda():
        assert main(["check", "models/digits_logreg.nn", "--backends", "cuda"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"  cuda +train_step 3 +[0-9.e+-]+ +1e-04 +ok", out)


@pytest.mark.skipif(gpu_problem() is None, reason="pycuda runs here")
def test_cuda_where_it_cannot_run(capsys):
    assert main(["check", "models/backprop_example.nn", "--backends", "numpy,cuda"]) == 1
    assert "error: cannot check the cuda backend here: " in capsys.readouterr().err
    # `all` takes the backends that run here.
    assert main(["check", "models/backprop_example.nn", "--backends", "all"]) == 0
    captured = capsys.readouterr()
    assert "note: cannot check the cuda backend here: " in captured.err
    assert "cuda not available here" in captured.out


def test_unknown_backend_is_a_clean_error(capsys):
    assert main(["check", "models/backprop_example.nn", "--backends", "numpy,tpu"]) == 1
    assert "unknown backend 'tpu'" in capsys.readouterr().err
    assert parse_backends(" llvm, numpy,llvm") == (["llvm", "numpy"], True)


def test_differences_are_normwise_and_specials_must_match():
    import numpy as np
    want = {"a": np.array([1.0, -2.0, np.nan, np.inf], np.float32),
            "g": np.array([1e-9, -1e-9], np.float32)}        # cancels: compared to the floor
    same = compare("x", "g", {k: v.copy() for k, v in want.items()}, want)
    assert same.ok and same.difference == 0.0
    near = {"a": np.array([1.0, -2.0 * (1 + 1e-6), np.nan, np.inf], np.float32),
            "g": np.array([-1e-9, 1e-9], np.float32)}
    assert compare("x", "g", near, want).difference < TOLERANCES[DType.f32]
    wrong_special = {**want, "a": np.array([1.0, -2.0, 0.0, np.inf], np.float32)}
    result = compare("x", "g", wrong_special, want)
    assert not result.ok and result.value == "a"
    steps = {"#step": np.array(3)}
    assert not compare("x", "g", {"#step": np.array(4)}, steps).ok
