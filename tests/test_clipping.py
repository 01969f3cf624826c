"""Gradient clipping in the train block, against PyTorch's documented rules: clip_grad_value_
puts every element into [-c, c]; clip_grad_norm_ scales all gradients by
min(1, max_norm / (total L2 norm + 1e-6)). One SGD step with lr = 1 makes the step the clipped
gradient itself."""
from __future__ import annotations

import numpy as np
import pytest

import graphc

MODEL = """model m {
    input x: f64[N, 3]
    input t: f64[N, 2]
    param W: f64[3, 2] = normal()
    param b: f64[2] = normal()
    output f = x @ W + b
    loss = mse(f, t)
}
"""


def _step(clip: str):
    program = graphc.compile_source(MODEL + f"train m {{ optimizer = sgd(lr=1.0)\n seed = 3\n {clip} }}\n")
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((6, 3)) * 10, "t": rng.standard_normal((6, 2)) * 10}
    before = {k: v.copy() for k, v in program.params.items()}
    _, grads = program.loss_and_grads(**batch)
    program.train_step(**batch)
    steps = {k: before[k] - program.params[k] for k in before}
    return grads, steps


def test_no_clipping_steps_by_the_raw_gradient():
    grads, steps = _step("")
    for k in grads:
        np.testing.assert_allclose(steps[k], grads[k], rtol=1e-12)


def test_clip_by_value():
    grads, steps = _step("clip_grad_value = 0.5")
    assert max(np.abs(g).max() for g in grads.values()) > 0.5          # something is clipped
    for k in grads:
        np.testing.assert_allclose(steps[k], np.clip(grads[k], -0.5, 0.5), rtol=1e-12)


@pytest.mark.parametrize("max_norm", [0.1, 1e6])
def test_clip_by_global_norm(max_norm):
    grads, steps = _step(f"clip_grad_norm = {max_norm}")
    total = np.sqrt(sum(np.sum(g * g) for g in grads.values()))
    scale = min(1.0, max_norm / (total + 1e-6))
    for k in grads:
        np.testing.assert_allclose(steps[k], grads[k] * scale, rtol=1e-12)
    if max_norm < total:
        assert np.isclose(np.sqrt(sum(np.sum(s * s) for s in steps.values())), max_norm)


def test_clipping_runs_alike_on_the_llvm_backend():
    src = MODEL + ("train m { optimizer = adam(lr=0.1)\n seed = 3\n clip_grad_norm = 0.5\n"
                   " clip_grad_value = 0.2 }\n")
    ref, fast = graphc.compile_source(src), graphc.compile_source(src, backend="llvm")
    rng = np.random.default_rng(1)
    for _ in range(5):
        batch = {"x": rng.standard_normal((7, 3)) * 5, "t": rng.standard_normal((7, 2)) * 5}
        np.testing.assert_allclose(fast.train_step(**batch), ref.train_step(**batch), rtol=1e-9)
    for k in ref.params:
        np.testing.assert_allclose(fast.params[k], ref.params[k], rtol=1e-9, atol=1e-12)


def test_a_clip_setting_must_be_positive():
    with pytest.raises(graphc.GraphcError, match="clip_grad_norm"):
        graphc.compile_source(MODEL + "train m { optimizer = sgd(lr=1.0)\n clip_grad_norm = 0 }\n")
