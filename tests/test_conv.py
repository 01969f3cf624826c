"""Convolution, pooling and batch norm: the ops against direct loops, their gradients against float64
finite differences on odd shapes, the layers, batch norm's two modes and running statistics, and the
llvm backend against numpy on whole training steps."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import run_op

import graphc
from graphc.compiler import check_source, program_graphs
from graphc.errors import GraphcError
from graphc.gradcheck import check_gradients
from graphc.ir import OPS

rng = np.random.default_rng(7)


def randn(*shape):
    return rng.standard_normal(shape)


# --- direct-loop references ---------------------------------------------------------------------------

def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_loops(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    out = np.zeros((n, o, oh, ow))
    for i in range(n):
        for oc in range(o):
            g = oc // og
            for y in range(oh):
                for z in range(ow):
                    total = 0.0 if b is None else b[oc]
                    for ic in range(cg):
                        for u in range(kh):
                            for v in range(kw):
                                r, s = y * sh - ph + u * dh, z * sw - pw + v * dw
                                if 0 <= r < h and 0 <= s < wd:
                                    total += x[i, g * cg + ic, r, s] * w[oc, ic, u, v]
                    out[i, oc, y, z] = total
    return out


def pool_loops(x, kernel, stride=None, padding=0, kind="max"):
    (kh, kw), (ph, pw) = pair(kernel), pair(padding)
    sh, sw = pair(stride) if stride is not None else (kh, kw)
    n, c, h, wd = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(n):
        for ch in range(c):
            for y in range(oh):
                for z in range(ow):
                    vals = []
                    for u in range(kh):
                        for v in range(kw):
                            r, s = y * sh - ph + u, z * sw - pw + v
                            inside = 0 <= r < h and 0 <= s < wd
                            vals.append(x[i, ch, r, s] if inside else (-np.inf if kind == "max" else 0.0))
                    out[i, ch, y, z] = max(vals) if kind == "max" else sum(vals) / len(vals)
    return out


CONV_CASES = [
    ((2, 3, 7, 6), (4, 3, 3, 2), True, {}),
    ((2, 3, 7, 6), (4, 3, 3, 3), False, {"stride": 2, "padding": 1}),
    ((1, 2, 9, 8), (3, 2, 2, 3), True, {"stride": [2, 1], "padding": [1, 2], "dilation": 2}),
    ((2, 4, 5, 5), (6, 2, 3, 1), True, {"groups": 2, "padding": [0, 1]}),
    ((3, 1, 5, 4), (2, 1, 5, 4), True, {}),                     # the kernel covers the image
]


@pytest.mark.parametrize("xs, ws, bias, attrs", CONV_CASES)
def test_conv2d_matches_direct_loops(xs, ws, bias, attrs):
    x, w = randn(*xs), randn(*ws)
    arrays = [x, w] + ([randn(ws[0])] if bias else [])
    want = conv_loops(*arrays, **attrs)
    np.testing.assert_allclose(OPS["conv2d"].numpy(*arrays, **attrs), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run_op("conv2d", arrays, attrs), want, rtol=1e-12, atol=1e-12)


POOL_CASES = [
    ("max_pool2d", (2, 3, 7, 6), {"kernel": 2}),
    ("max_pool2d", (2, 3, 7, 6), {"kernel": 3, "stride": 2, "padding": 1}),
    ("max_pool2d", (1, 2, 5, 8), {"kernel": [2, 3], "stride": [1, 2]}),
    ("avg_pool2d", (2, 3, 7, 6), {"kernel": 2}),
    ("avg_pool2d", (2, 3, 7, 6), {"kernel": 3, "stride": 2, "padding": 1}),
    ("avg_pool2d", (1, 2, 5, 8), {"kernel": [3, 2], "stride": [2, 3]}),
]


@pytest.mark.parametrize("op, xs, attrs", POOL_CASES)
def test_pooling_matches_direct_loops(op, xs, attrs):
    x = randn(*xs)
    want = pool_loops(x, **attrs, kind=op[:3])
    np.testing.assert_allclose(OPS[op].numpy(x, **attrs), want, rtol=1e-12)
    np.testing.assert_allclose(run_op(op, [x], attrs), want, rtol=1e-12)


def test_window_add_is_the_adjoint_of_window():
    """<window(x), g> == <x, window_add(g)> for every x and g: the gradient rules of both."""
    attrs = {"kernel": (2, 3), "stride": (2, 1), "dilation": (1, 2)}
    x = randn(2, 3, 7, 9)
    g = randn(*OPS["window"].numpy(x, **attrs).shape)
    back = run_op("window_add", [g], {"size": (7, 9), **attrs})
    assert back.shape == x.shape
    np.testing.assert_allclose(np.sum(OPS["window"].numpy(x, **attrs) * g), np.sum(x * back), rtol=1e-12)


# --- gradients: float64 central differences -------------------------------------------------------

GRAD_MODELS = {
    "strided": """
        h = x -> conv(3, [3, 2], stride=2, padding=1) -> tanh -> conv(4, 2, dilation=[1, 2]) -> tanh
        z = h -> avg_pool(2, stride=1) -> flatten -> linear(5)""",
    "pooled": """
        h = x -> conv(4, 3, padding=1) -> tanh -> max_pool(3, stride=2, padding=1)
        z = h -> flatten -> linear(5)""",
    "grouped": """
        param W: f32[4, 1, 2, 2] = kaiming()
        h = tanh(conv2d(x -> conv(2, 1), W, groups=2, stride=[1, 2]))
        z = h -> flatten -> linear(5)""",
    "batchnorm": """
        h = x -> conv(3, 3) -> batchnorm -> tanh -> flatten -> linear(6) -> batchnorm -> tanh
        z = h -> linear(5)""",
}


@pytest.mark.parametrize("name", list(GRAD_MODELS))
def test_gradients_match_finite_differences(name):
    source = f"""model m {{
        input x: f32[N, 1, 7, 6]
        input y: i64[N]
        {GRAD_MODELS[name]}
        output z
        loss = cross_entropy(z, y)
    }}"""
    _, results = check_gradients(check_source(source))
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]
    assert all(r.checked > 0 for r in results)


# --- layers ----------------------------------------------------------------------------------------------

CNN = """
model cnn {
    input x: f32[N, 1, 12, 10]
    input y: i64[N]
    h = x -> conv(4, 3) -> batchnorm -> relu -> max_pool(2) -> dropout(0.25) -> flatten
          -> linear(16) -> batchnorm -> relu -> linear(3)
    output z = h
    loss = cross_entropy(h, y) + 1e-3 * l2(weights)
}
train cnn {
    optimizer = sgd(lr=0.1, momentum=0.9)
    batch = 8
    seed = 3
}
"""


def test_conv_and_batchnorm_layers_declare_pytorch_parameters():
    program = graphc.compile_source(CNN)
    roles = {name: (info.role, tuple(info.type.shape)) for name, info in program.param_info.items()}
    assert roles["h.conv.W"] == ("weight", (4, 1, 3, 3))
    assert roles["h.conv.b"] == ("bias", (4,))
    assert roles["h.batchnorm.gamma"] == ("other", (4,))
    assert roles["h.batchnorm.beta"] == ("bias", (4,))
    assert roles["h.batchnorm.running_mean"] == ("stat", (4,))
    assert roles["h.batchnorm.running_var"] == ("stat", (4,))
    assert roles["h.batchnorm_2.running_var"] == ("stat", (16,))
    p = program.params
    np.testing.assert_array_equal(p["h.batchnorm.gamma"], 1)
    np.testing.assert_array_equal(p["h.batchnorm.running_var"], 1)
    np.testing.assert_array_equal(p["h.batchnorm.running_mean"], 0)
    np.testing.assert_array_equal(p["h.conv.b"], 0)
    # Kaiming by fan_in = in_channels * kh * kw = 9
    big = graphc.compile_source(CNN.replace("conv(4, 3)", "conv(4000, 3)"))
    assert abs(big.params["h.conv.W"].std() - np.sqrt(2 / 9)) < 0.01


def _feeds(n, seed=0):
    r = np.random.default_rng(seed)
    return {"x": r.standard_normal((n, 1, 12, 10)).astype(np.float32), "y": r.integers(0, 3, n)}


def test_batchnorm_training_step_updates_running_statistics_like_pytorch():
    """With a learning rate of 1e-12 only the running statistics move: mean 0.9 * 0 + 0.1 *
    batch mean, var 0.9 * 1 + 0.1 * unbiased batch variance of the values batch norm sees."""
    source = """model m {
        input x: f32[N, 3]
        input y: f32[N, 3]
        h = x -> batchnorm
        output h
        loss = mse(h, y)
    }
    train m { optimizer = sgd(lr=1e-12) }"""
    program = graphc.compile_source(source)
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32) * 3 + 2
    program.train_step(x=x, y=np.zeros_like(x))
    np.testing.assert_allclose(program.params["h.running_mean"], 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(program.params["h.running_var"], 0.9 + 0.1 * x.var(0, ddof=1),
                               rtol=1e-5)
    # Evaluation normalizes with the running statistics, not the batch's.
    rm, rv = program.params["h.running_mean"], program.params["h.running_var"]
    np.testing.assert_allclose(program.forward(x=x)["h"], (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-5)


def test_batch_norm_op_in_training_mode_uses_batch_statistics():
    x, g, b = randn(6, 3, 4, 5) * 2 + 1, randn(3), randn(3)
    got = run_op("batch_norm", [x, g, b, randn(3), np.abs(randn(3))], {"train": True})
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    want = (x - mean) / np.sqrt(var + 1e-5) * g[:, None, None] + b[:, None, None]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_a_training_batch_of_one_is_an_error_not_a_division_by_zero():
    from graphc.runtime.program import ProgramError
    program = graphc.compile_source(CNN)          # batch norm over [N, 16] features
    before = {k: v.copy() for k, v in program.params.items()}
    with pytest.raises(ProgramError, match=r"batch norm needs at least 2 values per channel"):
        program.train_step(**_feeds(1))
    with pytest.raises(ProgramError, match=r"this batch gives it \[1, 16\]"):
        program.loss_and_grads(**_feeds(1))
    assert all(np.array_equal(before[k], program.params[k]) for k in before)
    program.train_step(**_feeds(2))              # two samples are enough
    assert np.isfinite(program.params["h.batchnorm_2.running_var"]).all()
    # evaluation of one sample is fine (running statistics)
    assert np.isfinite(program.forward(x=_feeds(1)["x"])["z"]).all()
    # what the check reads: the shapes batch norm normalizes
    assert program.meta["batch_norm"] == [["N", 4, 10, 8], ["N", 16]]


def test_evaluation_handles_a_batch_of_one():
    """In evaluation every sample is normalized by the running statistics alone, so a batch of
    one gives each sample's own row of a larger batch."""
    program = graphc.compile_source(CNN)
    for _ in range(3):
        program.train_step(**_feeds(8))
    feeds = _feeds(5, seed=9)
    whole = program.forward(x=feeds["x"])["z"]
    for i in range(5):
        np.testing.assert_allclose(program.forward(x=feeds["x"][i:i + 1])["z"], whole[i:i + 1],
                                   rtol=1e-5, atol=1e-6)


def test_regularization_and_gradients_never_reach_batchnorm_statistics():
    ir = check_source(CNN).pick(None)
    graphs, state, _ = program_graphs(ir, check_source(CNN).trains["cnn"])
    grads = {name for name, _ in graphs["loss_and_grads"].outputs if name.startswith("grad ")}
    assert "grad h.batchnorm.running_mean" not in grads and "grad h.conv.W" in grads
    assert not any("running" in name for name in state)          # no momentum buffers for them
    # l2(weights) covers the conv and linear weights only
    assert {n for n, p in ir.params.items() if p.role == "weight"} == \
        {"h.conv.W", "h.linear.W", "h.linear_2.W"}


def test_monte_carlo_dropout_keeps_batchnorm_in_evaluation_mode():
    ir = check_source(CNN).pick(None)
    graphs, _, _ = program_graphs(ir, None)
    reads = {n.attr["name"] for n in graphs["sample"].nodes() if n.op == "param"}
    assert "h.batchnorm.running_mean" in reads           # evaluation mode reads the running stats
    assert any(n.op == "uniform" for n in graphs["sample"].nodes())   # dropout is on


def test_llvm_trains_a_cnn_with_batchnorm_like_numpy():
    ref = graphc.compile_source(CNN)
    fast = graphc.compile_source(CNN, backend="llvm")
    for step in range(3):
        feeds = _feeds(8, seed=step)
        a, b = ref.train_step(**feeds), fast.train_step(**feeds)
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))
    for name in ref.params:
        np.testing.assert_allclose(fast.params[name], ref.params[name], rtol=2e-4, atol=2e-5,
                                   err_msg=name)
    assert not np.allclose(ref.params["h.batchnorm.running_mean"], 0)


def test_trained_cnn_round_trips_through_an_artifact(tmp_path):
    program = graphc.compile_source(CNN)
    program.train_step(**_feeds(8))
    program.save(tmp_path / "cnn")
    loaded = graphc.load_artifact(tmp_path / "cnn")
    x = _feeds(4, seed=5)["x"]
    np.testing.assert_array_equal(loaded.forward(x=x)["z"], program.forward(x=x)["z"])
    assert loaded.param_info["h.batchnorm.running_var"].role == "stat"
    assert loaded.meta["batch_norm"] == program.meta["batch_norm"]        # the batch-of-1 check


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ("h = conv(x2, 4, 3)", "conv: needs floating-point images [N, C, H, W]"),
    ("h = x -> conv(4, 11)", "does not fit in the 12x10 images"),
    ("h = x -> conv(4, 3, stride=0)", "stride must be an integer >= 1"),
    ("h = x -> conv(4, 3, paddin=1)", "conv has no option 'paddin'"),
    ("param W: f32[4, 2, 3, 3] = kaiming()\n h = conv2d(x, W)", "expects 2 input channels"),
    ("param W: f32[4, 1, 3, 3] = kaiming()\n h = conv2d(x, W, groups=3)", "groups=3 must divide"),
    ("h = x -> max_pool(2, padding=2)", "padding [2, 2] must be at most half the kernel"),
    ("h = x2 -> batchnorm", None),
    ("h = x3 -> batchnorm", "batchnorm: needs floating-point features [N, C] or images"),
    ("h = x -> batchnorm(momentun=0.2)", "batchnorm has no option 'momentun'"),
])
def test_mistakes_are_reported_where_they_are_written(body, message):
    source = f"""model m {{
    input x: f32[N, 1, 12, 10]
    input x2: f32[N, 5]
    input x3: f32[N, 2, 5]
    {body}
    output h
}}"""
    if message is None:
        check_source(source)          # [N, C] features are fine
        return
    with pytest.raises(GraphcError) as err:
        check_source(source)
    text = err.value.render()
    assert message in text, text
    assert "<string>:5:" in text or "<string>:6:" in text, text
    assert "^" in text


def test_a_convolutions_weight_gradient_is_the_product_blas_runs_faster():
    """The weight gradient of a convolution, a sum over every output pixel of the batch, is
    computed as columns @ Gᵀ into [C*kh*kw, O] (OpenBLAS runs it about 10% faster than
    G @ columnsᵀ into [O, C*kh*kw] on MNIST's second layer; docs/backends.md, "Convolutions"),
    and the update reads it transposed."""
    from graphc.backends.kernels import plan_kernels
    program = graphc.compile_file("models/mnist_cnn.nn")
    plan = plan_kernels(program.graphs["train_step"], program.updates("train_step"))
    spaces = {k.space for k in plan.kernels if k.matmul}
    for o, ckk, pixels in ((32, 9, 676), (64, 288, 576)):
        assert ((ckk, ()), (pixels, ("N",)), (o, ())) in spaces
        assert ((o, ()), (pixels, ("N",)), (ckk, ())) not in spaces
