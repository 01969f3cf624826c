"""Monte Carlo dropout: `Program.sample` runs the outputs with dropout on, a different mask per
sample and the same masks for the same seed, on every backend; `graphc predict --mc-samples K`
prints the mean prediction and its spread."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO

import graphc
from graphc.cli import main

DIGITS_MLP = REPO / "models/digits_mlp.nn"          # dropout(0.2)


def _x(n=4):
    return np.random.default_rng(0).random((n, 64)).astype(np.float32)


def test_samples_differ_are_reproducible_and_center_on_the_prediction():
    program = graphc.compile_file(DIGITS_MLP)
    samples = program.sample(200, x=_x())["probs"]
    assert samples.shape == (200, 4, 10)
    assert not np.array_equal(samples[0], samples[1])            # a new mask each time
    np.testing.assert_array_equal(samples, program.sample(200, x=_x())["probs"])
    # log-probabilities: the mean probability with dropout on is near the prediction without it
    mean = np.exp(samples).mean(axis=0)
    assert np.abs(mean - np.exp(program.forward(x=_x())["probs"])).max() < 0.05
    assert np.exp(samples).std(axis=0).max() > 1e-4


def test_llvm_draws_the_same_masks():
    x = _x()
    ref = graphc.compile_file(DIGITS_MLP).sample(5, x=x)["probs"]
    fast = graphc.compile_file(DIGITS_MLP, backend="llvm").sample(5, x=x)["probs"]
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)


def test_a_model_without_dropout_cannot_sample():
    program = graphc.compile_file(REPO / "models/digits_logreg.nn")
    assert "sample" not in program.graphs
    with pytest.raises(ValueError, match="has no dropout"):
        program.sample(3, x=_x())


def test_artifacts_keep_the_sampling_graph(tmp_path):
    program = graphc.compile_file(DIGITS_MLP)
    program.save(tmp_path / "a")
    again = graphc.load_artifact(tmp_path / "a")
    np.testing.assert_array_equal(again.sample(3, x=_x())["probs"], program.sample(3, x=_x())["probs"])


def test_predict_with_mc_samples(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(DIGITS_MLP), "--epochs", "1", "--quiet", "--out", str(run)]) == 0
    np.save(tmp_path / "x.npy", _x(3) * 16)             # raw digits pixels, scaled as in training
    capsys.readouterr()
    out = tmp_path / "mc.npz"
    assert main(["predict", str(run), "--input", str(tmp_path / "x.npy"), "--mc-samples", "16",
                 "-o", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("±" in line and "over 16 samples" in line for line in lines)
    saved = np.load(out)
    assert saved["probabilities"].shape == saved["std"].shape == (3, 10)
    np.testing.assert_allclose(saved["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert main(["predict", str(run), "--input", str(tmp_path / "x.npy"), "--mc-samples", "1"]) == 1
