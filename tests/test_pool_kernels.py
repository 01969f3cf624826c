"""Max-pooling's gradient on the llvm backend (graphc/backends/kernels/windows.py and the scatter
rule of fuse.py): one kernel for the pooling's backward and the ReLU mask after it, and the
gradient each window's elements get is numpy's, ties included (shared equally among them)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from graphc.api import compile_source
from graphc.backends.kernels import plan_kernels

POOL_NN = """
model pool {{
    input x: f32[N, 3, {h}, {w}]
    input v: f32[N, 3, {oh}, {ow}]
    param s: f32[3, {h}, {w}] = ones()
    output o = {pool}
    loss = sum({pool} * v)
}}
train pool {{ optimizer = sgd(lr=0.1) }}
"""

# (image size, pooling): exact cover (the mnist_cnn case), rows and columns left over, overlapping
# windows (the planner's general col2im), and no ReLU before the pooling
CASES = {
    "exact": ((12, 10), "max_pool2d(relu(x * s), 2)"),
    "rows": ((24, 24), "max_pool2d(relu(x * s), 2)"),
    "leftover": ((13, 11), "max_pool2d(relu(x * s), 2)"),
    "overlap": ((11, 9), "max_pool2d(relu(x * s), 3, stride=2)"),
    "no_relu": ((12, 10), "max_pool2d(x * s, 2)"),
}


def _source(case: str) -> tuple[str, tuple]:
    (h, w), pool = CASES[case]
    k, stride = (3, 2) if "stride=2" in pool else (2, 2)
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    return POOL_NN.format(h=h, w=w, oh=oh, ow=ow, pool=pool), (k, stride, oh, ow)


def _expected_grad(x, v, k, stride, relu):
    """d loss / d s at s = 1 by loops over the windows: each window's upstream value shared
    equally among the elements equal to its maximum."""
    a = np.maximum(x, 0) if relu else x
    up = np.zeros_like(x, dtype=np.float64)
    n, c, oh, ow = v.shape
    for b, ch, i, j in np.ndindex(n, c, oh, ow):
        win = a[b, ch, i * stride:i * stride + k, j * stride:j * stride + k]
        hit = win == win.max()
        up[b, ch, i * stride:i * stride + k, j * stride:j * stride + k] += hit * (
            np.float64(v[b, ch, i, j]) / hit.sum())
    if relu:
        up = np.where(a > 0, up, 0.0)
    return (x * up).sum(axis=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pooling_gradient_shares_ties_like_numpy(case):
    source, (k, stride, oh, ow) = _source(case)
    ref = compile_source(source)
    fast = compile_source(source, backend="llvm")
    rng = np.random.default_rng(7)
    (h, w), _ = CASES[case]
    # small integers: many windows with two, three or four equal maxima, zeros among them
    x = rng.integers(-2, 3, (2, 3, h, w)).astype(np.float32)
    v = rng.standard_normal((2, 3, oh, ow)).astype(np.float32)
    want = _expected_grad(x, v, k, stride, relu="relu" in CASES[case][1])
    for program in (ref, fast):
        loss, grads = program.loss_and_grads(x=x, v=v)
        got = grads["s"]
        assert np.array_equal(got != 0, want != 0), f"{case}: the elements that get a gradient differ"
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=case)
    np.testing.assert_array_equal(fast.forward(x=x)["o"], ref.forward(x=x)["o"])


def _pool_kernels(case: str, ordered: bool) -> list:
    source, _ = _source(case)
    program = compile_source(source)
    plan = plan_kernels(program.graphs["train_step"], program.updates("train_step"), ordered=ordered)
    return [k for k in plan.kernels if any(n.op == "window_add" for n in k.nodes)]


def test_pooling_gradient_and_relu_mask_are_one_kernel():
    (kernel,) = _pool_kernels("exact", ordered=True)
    ops = {n.op for n in kernel.nodes}
    assert {"where", "div", "window_add"} <= ops          # the ReLU mask and the shared gradient
    assert not kernel.reduce_axes and len(kernel.stores) == 1
    assert kernel.window_axes == 2                        # each window's offsets innermost
    # rows and columns no window covers are zeroed first; the scatter is still one kernel
    fill, scatter = _pool_kernels("leftover", ordered=True)
    assert not fill.loads and scatter.window_axes == 2
    # overlapping windows keep the general col2im (a zeroed image, then one pass adding into it)
    fill, add = _pool_kernels("overlap", ordered=True)
    assert add.window_axes == 0 and add.stores[0].access in add.loads
    # a backend that runs a kernel's points at once (cuda) keeps a kernel per window offset
    assert len(_pool_kernels("exact", ordered=False)) == 5


def test_pooled_rows_are_vectorized():
    """The 12 windows of a pooled row are fewer iterations than LLVM's vectorizer takes on by
    itself: the forward max and the fused gradient ask for it (llvm.loop.vectorize.enable)."""
    source, (k, stride, oh, ow) = _source("rows")
    program = compile_source(source, backend="llvm")
    x = np.ones((2, 3, 24, 24), np.float32)
    program.loss_and_grads(x=x, v=np.ones((2, 3, oh, ow), np.float32))
    text = program._executors["train_step"].source()
    vectorized = set(re.findall(r"^!(\d+) = distinct !\{.*llvm\.loop\.vectorize\.enable", text, re.M))
    asking = set()
    for function in text.split("\ndefine ")[1:]:
        name = function.split("(", 1)[0]
        if any(loop in vectorized for loop in re.findall(r"!llvm\.loop !(\d+)", function)):
            asking.add(re.sub(r"_[0-9a-f]{10}$", "", name.split("@", 1)[1]))
    assert {"max", "window_add"} <= asking
