"""The bundled models and the issue's three examples: they compile, and their outputs (and loss)
match hand-written numpy computed from the same parameters."""
from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import MODELS, REPO

import graphc
from graphc.backends.numpy.executor import NumpyExecutor
from graphc.compiler import check_source, lower, model_graph
from graphc.passes import PipelineOptions

rng = np.random.default_rng(1)
TOL = dict(rtol=1e-6, atol=1e-6)


def loss_of(path, params, feeds, dims):
    """Evaluate a model's loss (eval mode) on the numpy backend."""
    checked = check_source((REPO / path).read_text(), str(path))
    graph = lower(model_graph(next(iter(checked.models.values()))), PipelineOptions(verify=True))
    return NumpyExecutor(graph).run(feeds, dict(params), dims)["loss"]


def log_softmax(z):
    s = z - z.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def test_mnist_mlp_matches_numpy():
    p = graphc.compile_file(REPO / "models/mnist_mlp.nn")
    x = rng.random((16, 784), dtype=np.float32)
    y = rng.integers(0, 10, 16)
    W1, b1, W2, b2 = (p.params[k] for k in ("W1", "b1", "W2", "b2"))
    logp = log_softmax(np.maximum(x @ W1 + b1, 0) @ W2 + b2)      # dropout is off at inference
    np.testing.assert_allclose(p.forward(x=x)["logp"], logp, **TOL)
    expected_loss = -logp[np.arange(16), y].mean() + 1e-4 * ((W1 ** 2).sum() + (W2 ** 2).sum())
    got = loss_of("models/mnist_mlp.nn", p.params, {"x": x, "y": y}, {"N": 16})
    np.testing.assert_allclose(got, expected_loss, **TOL)


def test_mnist_layers_matches_numpy():
    p = graphc.compile_file(REPO / "models/mnist_layers.nn")
    assert sorted(p.params) == ["logits.block.W", "logits.block.b", "logits.linear.W",
                                "logits.linear.b"]
    x = rng.random((8, 784), dtype=np.float32)
    y = rng.integers(0, 10, 8)
    W1, b1 = p.params["logits.block.W"], p.params["logits.block.b"]
    W2, b2 = p.params["logits.linear.W"], p.params["logits.linear.b"]
    logits = np.maximum(x @ W1 + b1, 0) @ W2 + b2
    probs = np.exp(log_softmax(logits))
    np.testing.assert_allclose(p.forward(x=x)["probs"], probs, **TOL)
    # l2(weights) covers the two weight matrices and never a bias.
    expected = -log_softmax(logits)[np.arange(8), y].mean() + 1e-4 * ((W1 ** 2).sum() + (W2 ** 2).sum())
    got = loss_of("models/mnist_layers.nn", p.params, {"x": x, "y": y}, {"N": 8})
    np.testing.assert_allclose(got, expected, **TOL)


def test_backprop_example_matches_numpy():
    p = graphc.compile_file(REPO / "models/backprop_example.nn")
    x = rng.standard_normal((10, 3)).astype(np.float32)
    t = rng.standard_normal(10).astype(np.float32)
    W, beta = p.params["W"], p.params["beta"]
    f = (1 / (1 + np.exp(-(x @ W.T)))) @ beta
    np.testing.assert_allclose(p.forward(x=x)["f"], f, **TOL)
    got = loss_of("models/backprop_example.nn", p.params, {"x": x, "t": t}, {"N": 10})
    np.testing.assert_allclose(got, np.mean((f - t) ** 2), **TOL)
    assert p.param_info["beta"].role == "weight"   # multiplied in by a matrix product


def test_float64_model_matches_numpy_tightly():
    src = (REPO / "models/mnist_mlp.nn").read_text().replace("f32", "f64")
    p = graphc.compile_source(src)
    x = rng.random((4, 784))
    W1, b1, W2, b2 = (p.params[k] for k in ("W1", "b1", "W2", "b2"))
    assert W1.dtype == np.float64
    expected = log_softmax(np.maximum(x @ W1 + b1, 0) @ W2 + b2)
    np.testing.assert_allclose(p.forward(x=x)["logp"], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", MODELS, ids=[m.name for m in MODELS])
def test_every_bundled_model_compiles_and_runs(path):
    p = graphc.compile_file(path)
    feeds = {}
    for name, ttype in p.inputs.items():
        shape = [3 if isinstance(d, str) else d for d in ttype.shape]
        feeds[name] = rng.random(shape).astype(ttype.dtype.numpy)
    outs = p.forward(**feeds)
    assert set(outs) == set(p.outputs)
    for value in outs.values():
        assert np.all(np.isfinite(value))


def test_initialization_follows_the_declared_initializers():
    p = graphc.compile_file(REPO / "models/mnist_mlp.nn")
    W1 = p.params["W1"]
    assert np.all(p.params["b1"] == 0) and np.all(p.params["b2"] == 0)
    assert abs(W1.std() - np.sqrt(2 / 784)) < 0.02 * np.sqrt(2 / 784)   # Kaiming: N(0, 2/fan_in)
    assert abs(W1.mean()) < 1e-3
    q = graphc.compile_file(REPO / "models/backprop_example.nn", seed=5)
    W = q.params["W"]
    assert W.shape == (4, 3)


def test_initialization_is_seeded_and_per_parameter():
    a = graphc.compile_file(REPO / "models/mnist_mlp.nn")
    b = graphc.compile_file(REPO / "models/mnist_mlp.nn")
    c = graphc.compile_file(REPO / "models/mnist_mlp.nn", seed=2)
    np.testing.assert_array_equal(a.params["W1"], b.params["W1"])     # the train block's seed
    assert not np.array_equal(a.params["W1"], c.params["W1"])
    assert not np.array_equal(a.params["W1"][:256, :10], a.params["W2"])


INIT_MODEL = """model m {{ input x: f32[N, 200]
    param W: f32[200, 400] = {init}
    output y = x @ W }}
"""


@pytest.mark.parametrize("init, check", [
    # (the declaration, what the drawn matrix must satisfy); graphc's 2-D weights are [in, out]
    ("kaiming()", lambda w: abs(w.std() / np.sqrt(2 / 200) - 1) < 0.02),
    ("kaiming(mode=fan_out)", lambda w: abs(w.std() / np.sqrt(2 / 400) - 1) < 0.02),
    ("kaiming(dist=uniform)", lambda w: np.sqrt(6 / 200) * 0.99 < np.abs(w).max() <= np.sqrt(6 / 200)),
    ('kaiming(mode="fan_out", dist="uniform")',
     lambda w: np.sqrt(6 / 400) * 0.99 < np.abs(w).max() <= np.sqrt(6 / 400)),
    ("xavier()", lambda w: abs(w.std() / np.sqrt(2 / 600) - 1) < 0.02),
    ("xavier(dist=uniform)", lambda w: np.sqrt(6 / 600) * 0.99 < np.abs(w).max() <= np.sqrt(6 / 600)),
    ("orthogonal()", lambda w: np.allclose(w @ w.T, np.eye(200), atol=1e-5)),
    ("orthogonal(gain=0.5)", lambda w: np.allclose(w @ w.T, 0.25 * np.eye(200), atol=1e-5)),
])
def test_initializer_variants_draw_what_pytorch_does(init, check):
    w = graphc.compile_source(INIT_MODEL.format(init=init), seed=4).params["W"]
    assert w.shape == (200, 400) and check(w.astype(np.float64)), init


@pytest.mark.parametrize("init, message", [
    ("kaiming(mode=fan_avg)", "kaiming(): mode is one of fan_in, fan_out"),
    ("xavier(dist=gaussian)", "xavier(): dist is one of normal, uniform"),
])
def test_initializer_words_are_checked(init, message):
    with pytest.raises(graphc.GraphcError, match=re.escape(message)):
        graphc.compile_source(INIT_MODEL.format(init=init))


def test_orthogonal_needs_a_matrix():
    src = "model m { input x: f32[N, 3]\n param b: f32[3] = orthogonal()\n output y = x + b }"
    with pytest.raises(graphc.GraphcError, match=r"orthogonal\(\) needs a matrix"):
        graphc.compile_source(src)


def test_layernorm_layer_matches_pytorchs_definition_and_is_never_regularized():
    src = """model m { input x: f64[N, 6]
        input y: i64[N]
        h = x -> linear(8) -> layernorm(eps=1e-3) -> relu
        p = h -> linear(3) -> log_softmax(axis=1)
        output p
        loss = nll(p, y) + 1e-2 * l2(weights) }
"""
    program = graphc.compile_source(src)
    roles = {k: program.param_info[k].role for k in program.params}
    assert roles["h.layernorm.gamma"] == "other" and roles["h.layernorm.beta"] == "bias"
    np.testing.assert_array_equal(program.params["h.layernorm.gamma"], np.ones(8))
    np.testing.assert_array_equal(program.params["h.layernorm.beta"], np.zeros(8))
    l2_inputs = {n.attr["name"] for n in program.graphs["evaluate"].nodes() if n.op == "param"}
    assert "h.layernorm.gamma" in l2_inputs                     # used by the model ...
    checked = check_source(src, "m.nn")
    loss = checked.pick(None).loss
    penalized = {i.attr["name"] for n in _topo(loss) if n.op == "l2" for i in n.inputs}
    assert penalized == {"h.linear.W", "p.W"}                   # ... but not by the penalty
    x = np.random.default_rng(0).standard_normal((5, 6))
    z = x @ program.params["h.linear.W"] + program.params["h.linear.b"]
    mean, var = z.mean(axis=1, keepdims=True), z.var(axis=1, keepdims=True)   # biased variance
    want = np.maximum((z - mean) / np.sqrt(var + 1e-3), 0)
    got = graphc.compile_source(src.replace("output p", "output h\n        output p")).forward(x=x)
    np.testing.assert_allclose(got["h"], want, rtol=1e-12, atol=1e-12)


def test_layernorm_without_bias_has_only_its_scale():
    src = """model m { input x: f64[N, 3, 6]
        output h = x -> layernorm(bias=false, eps=1e-3) }
"""
    program = graphc.compile_source(src)
    assert list(program.params) == ["h.gamma"]
    gamma = np.random.default_rng(1).standard_normal(6)
    program.params["h.gamma"][...] = gamma
    x = np.random.default_rng(0).standard_normal((2, 3, 6)) * 3 + 1
    mean, var = x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)
    np.testing.assert_allclose(program.forward(x=x)["h"], (x - mean) / np.sqrt(var + 1e-3) * gamma,
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(graphc.GraphcError, match=r"layernorm: bias must be"):
        graphc.compile_source(src.replace("bias=false", "bias=2"))


def _topo(node):
    from graphc.ir.node import topo_order
    return topo_order([node])


def test_embedding_layer_looks_up_rows_and_learns_them():
    src = """model m { input t: i64[N, 5]
        input y: i64[N]
        e = t -> embedding(20, 4)
        p = e -> flatten -> linear(3) -> log_softmax(axis=1)
        output e
        output p
        loss = nll(p, y) }
train m { optimizer = adam(lr=1e-2)
        seed = 1 }
"""
    program = graphc.compile_source(src)
    table = program.params["e.E"]
    assert table.shape == (20, 4) and program.param_info["e.E"].role == "weight"
    assert abs(table.std() - 1) < 0.3                      # N(0, 1), as torch.nn.Embedding
    rng = np.random.default_rng(0)
    t, y = rng.integers(0, 20, (8, 5)), rng.integers(0, 3, 8)
    np.testing.assert_array_equal(program.forward(t=t)["e"], table[t])
    losses = [program.train_step(t=t, y=y) for _ in range(30)]
    assert losses[-1] < losses[0] * 0.5
    with pytest.raises(graphc.GraphcError, match="out of range"):
        program.forward(t=np.full((2, 5), 20))
