"""The op table: every op complete, composites' decompositions against their numpy oracles,
numerical stability, and the shape rules (symbolic dims, broadcasting, matmul, reshape)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import op_graph, run_op

from graphc.backends.numpy.executor import NumpyExecutor
from graphc.ir import OPS
from graphc.ir import ops as op_table
from graphc.ir.node import Graph
from graphc.ir.ops import Operand, TypeError_
from graphc.ir.shapes import broadcast, matmul_shape, reshape_shape
from graphc.ir.types import DType, TensorType
from graphc.passes import PipelineOptions, run_pipeline

rng = np.random.default_rng(0)


def randn(*shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def test_every_op_is_complete():
    for name, op in OPS.items():
        assert op.dtype_rule and op.shape_rule, name
        if op.kind == "source":
            continue
        assert op.numpy is not None, f"{name} has no numpy reference"
        assert op.doc, f"{name} has no doc line"
        if op.is_composite:
            assert op.kind == "composite", name


def test_numpy_backend_runs_every_primitive():
    from graphc.backends.numpy.executor import BACKENDS
    assert "numpy" in BACKENDS
    primitives = [n for n, op in OPS.items() if op.kind not in ("source", "composite")]
    assert {"matmul", "relu", "sum", "reshape", "where", "one_hot"} <= set(primitives)
    for name in primitives:
        assert callable(OPS[name].numpy), name


# --- composites: decomposition == oracle ------------------------------------------------------------

LABELS = np.array([3, 0, 9, 1, 1], dtype=np.int64)
COMPOSITE_CASES = [
    ("softmax", [randn(5, 10)], {"axis": 1}),
    ("softmax", [randn(2, 3, 4)], {"axis": 0}),
    ("log_softmax", [randn(5, 10)], {"axis": -1}),
    ("leaky_relu", [randn(4, 6)], {"slope": 0.2}),
    ("elu", [randn(4, 6) * 3], {"alpha": 0.7}),
    ("softplus", [randn(4, 6) * 30], {"beta": 2.0}),     # far tails: no overflow
    ("swish", [randn(4, 6) * 5], {}),
    ("gelu", [randn(4, 6) * 3], {}),
    ("gelu", [randn(4, 6) * 3], {"approximate": "tanh"}),
    ("conv2d", [randn(2, 3, 7, 6), randn(4, 3, 3, 2), randn(4)], {"stride": 2, "padding": 1}),
    ("max_pool2d", [randn(2, 3, 7, 6)], {"kernel": 3, "stride": 2, "padding": 1}),
    ("avg_pool2d", [randn(2, 3, 7, 6)], {"kernel": 2}),
    ("batch_norm", [randn(5, 3), randn(3), randn(3), randn(3), np.abs(randn(3))], {}),
    ("batch_norm", [randn(4, 3, 2, 5), randn(3), randn(3), randn(3), np.abs(randn(3))], {"train": True}),
    ("running_stat", [randn(5, 3), randn(3)], {"stat": "var", "momentum": 0.3}),
    ("running_stat", [randn(4, 3, 2, 5), randn(3)], {}),
    ("layer_norm", [randn(4, 6) * 3 + 1, randn(6), randn(6)], {"eps": 1e-5}),
    ("layer_norm", [randn(2, 4, 6) * 3 + 1, randn(6)], {"eps": 1e-3}),        # without beta
    ("embedding", [np.array([[3, 0, 3], [4, 4, 1]]), randn(5, 3)], {}),
    ("prelu", [randn(4, 6), np.abs(randn(6))], {}),
    ("prelu", [randn(2, 3, 4, 4), np.abs(randn(3))], {}),
    ("prelu", [randn(4, 6), np.array([0.25])], {}),
    ("linear", [randn(5, 7), randn(7, 3), randn(3)], {}),
    ("linear", [randn(5, 7), randn(7, 3)], {}),
    ("flatten", [randn(2, 3, 4, 5)], {}),
    ("mse", [randn(8), randn(8)], {}),
    ("mse", [randn(4, 3), randn(4, 3)], {}),
    ("nll", [randn(5, 10), LABELS], {}),
    ("cross_entropy", [randn(5, 10), LABELS], {}),
    ("binary_cross_entropy_with_logits", [randn(6) * 5, (randn(6) > 0).astype(np.float64)], {}),
    ("l2", [randn(3, 4), randn(5)], {}),
    ("l1", [randn(3, 4)], {}),
    ("dropout", [randn(4, 6)], {"p": 0.4}),       # evaluation: the identity
    ("attention", [randn(2, 3, 5, 4), randn(2, 3, 5, 4), randn(2, 3, 5, 2)], {}),
    ("attention", [randn(2, 5, 4), randn(2, 6, 4), randn(2, 6, 3)], {"causal": False}),
    ("cross_entropy", [randn(2, 5, 10), LABELS[None].repeat(2, 0)], {}),     # a sequence's logits
]


@pytest.mark.parametrize("op,arrays,attrs", COMPOSITE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(COMPOSITE_CASES)])
def test_composite_decomposition_matches_oracle(op, arrays, attrs):
    expected = OPS[op].numpy(*arrays, **attrs)
    got = run_op(op, arrays, attrs)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_every_composite_has_a_case():
    covered = {c[0] for c in COMPOSITE_CASES}
    composites = {n for n, op in OPS.items() if op.is_composite}
    assert composites <= covered, f"composites without an oracle test: {composites - covered}"


def test_cross_entropy_matches_textbook_formula():
    z = randn(5, 10)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(5), LABELS]))
    np.testing.assert_allclose(run_op("cross_entropy", [z, LABELS]), expected, rtol=1e-12)


# --- numerical stability ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_softmax_does_not_overflow(dtype):
    z = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 0.0]], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = run_op("log_softmax", [z], {"axis": 1})
        probs = run_op("softmax", [z], {"axis": 1})
    assert np.all(np.isfinite(out[:, :2]))
    np.testing.assert_allclose(out[0, :2], [0.0, -1e4], rtol=1e-6)
    np.testing.assert_allclose(out[1, :2], [-np.log(2), -np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), [1.0, 1.0], rtol=1e-6)


def test_sigmoid_and_bce_are_stable_in_the_tails():
    z = np.array([-1e4, -50.0, 0.0, 50.0, 1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = run_op("sigmoid", [z])
        loss = run_op("binary_cross_entropy_with_logits", [z, np.array([0.0, 0, 1, 1, 1])])
    np.testing.assert_allclose(s, [0.0, np.exp(-50.0), 0.5, 1.0, 1.0], rtol=1e-12, atol=0)
    assert np.isfinite(loss)


def test_nll_rejects_out_of_range_labels():
    from graphc.errors import GraphcError
    with pytest.raises(GraphcError, match=r"class label 10 is out of range \[0, 10\)"):
        run_op("nll", [randn(2, 10), np.array([1, 10])])


# --- primitives against numpy ------------------------------------------------------------------------

PRIMITIVE_CASES = [
    ("add", [randn(4, 3), randn(3)], {}, lambda a, b: a + b),
    ("sub", [randn(4, 1), randn(1, 5)], {}, lambda a, b: a - b),
    ("mul", [randn(2, 3), randn(2, 3)], {}, lambda a, b: a * b),
    ("div", [randn(3), np.abs(randn(3)) + 1], {}, lambda a, b: a / b),
    ("pow", [np.abs(randn(3)) + 0.1, randn(3)], {}, np.power),
    ("maximum", [randn(3, 2), randn(2)], {}, np.maximum),
    ("minimum", [randn(3, 2), randn(2)], {}, np.minimum),
    ("greater", [randn(3), randn(3)], {}, np.greater),
    ("neg", [randn(3)], {}, np.negative),
    ("exp", [randn(3)], {}, np.exp),
    ("log", [np.abs(randn(3)) + 0.1], {}, np.log),
    ("log1p", [np.abs(randn(3))], {}, np.log1p),
    ("sqrt", [np.abs(randn(3))], {}, np.sqrt),
    ("abs", [randn(3)], {}, np.abs),
    ("tanh", [randn(3)], {}, np.tanh),
    ("erf", [randn(5) * 2], {}, np.vectorize(math.erf)),
    ("relu", [randn(3, 3)], {}, lambda x: np.maximum(x, 0)),
    ("sigmoid", [randn(7)], {}, lambda x: 1 / (1 + np.exp(-x))),
    ("matmul", [randn(4, 5), randn(5, 2)], {}, np.matmul),
    ("matmul", [randn(3, 4, 5), randn(5, 2)], {}, np.matmul),
    ("matmul", [randn(4, 5), randn(5)], {}, np.matmul),
    ("matmul", [randn(5), randn(5, 2)], {}, np.matmul),
    ("sum", [randn(3, 4)], {"axis": 1}, lambda x: x.sum(axis=1)),
    ("sum", [randn(3, 4)], {}, np.sum),
    ("mean", [randn(3, 4, 2)], {"axis": (0, 2), "keepdims": True},
     lambda x: x.mean(axis=(0, 2), keepdims=True)),
    ("max", [randn(3, 4)], {"axis": -1}, lambda x: x.max(axis=-1)),
    ("reshape", [randn(2, 6)], {"shape": (3, -1)}, lambda x: x.reshape(3, 4)),
    ("transpose", [randn(2, 3, 4)], {}, np.transpose),
    ("transpose", [randn(2, 3, 4)], {"axes": (1, 0, 2)}, lambda x: x.transpose(1, 0, 2)),
    ("cast", [randn(3)], {"dtype": "f32"}, lambda x: x.astype(np.float32)),
    ("one_hot", [np.array([2, 0])], {"depth": 3}, lambda y: np.eye(3)[y].astype(np.float32)),
    ("broadcast_to", [randn(3, 1)], {"shape": (2, 3, 4)}, lambda x: np.broadcast_to(x, (2, 3, 4))),
    ("slice", [randn(3, 5)], {"axis": 1, "start": 1, "stop": 4}, lambda x: x[:, 1:4]),
    ("size", [randn(3, 5, 2)], {"axis": (0, 2), "dtype": "f64"}, lambda x: np.float64(6)),
    # one process: nothing to reduce across (several: tests/test_mpi.py)
    ("all_reduce", [randn(2, 3)], {"op": "mean"}, lambda x: x),
    ("causal_mask", [randn(2, 4, 4)], {}, lambda x: np.where(np.tril(np.ones((4, 4), bool)), x, -np.inf)),
]


@pytest.mark.parametrize("op,arrays,attrs,ref", PRIMITIVE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PRIMITIVE_CASES)])
def test_primitive_matches_numpy(op, arrays, attrs, ref):
    got = run_op(op, arrays, attrs)
    expected = ref(*arrays)
    assert got.shape == np.shape(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_where_and_concat():
    c = np.array([True, False, True])
    a, b = randn(3), randn(3)
    np.testing.assert_array_equal(run_op("where", [c, a, b]), np.where(c, a, b))
    x, y = randn(2, 3), randn(2, 5)
    np.testing.assert_array_equal(run_op("concat", [x, y], {"axis": 1}), np.concatenate([x, y], 1))


# --- shape rules ---------------------------------------------------------------------------------------

def T(*shape, dtype=DType.f32):
    return TensorType(dtype, tuple(shape))


def O(label, *shape, dtype=DType.f32):  # noqa: E743 (O for Operand, beside T for TensorType)
    return Operand(T(*shape, dtype=dtype), label)


def test_broadcast_with_symbolic_dims():
    assert broadcast("add", [O("a", "N", 256), O("b", 256)]) == ("N", 256)
    assert broadcast("add", [O("a", "N", 1), O("b", 1, 10)]) == ("N", 10)
    with pytest.raises(TypeError_, match=r"add: shapes do not broadcast: a is f32\[N, 256\], "
                                         r"b1 is f32\[265\] \(256 != 265 on the last axis\)"):
        broadcast("add", [O("a", "N", 256), O("b1", 265)])
    with pytest.raises(TypeError_):
        broadcast("add", [O("a", "N"), O("b", "M")])


def test_matmul_shapes_and_message():
    assert matmul_shape(O("x", "N", 784), O("W", 784, 256)) == ("N", 256)
    assert matmul_shape(O("z", "N", 4), O("beta", 4)) == ("N",)
    assert matmul_shape(O("v", 4), O("w", 4)) == ()
    assert matmul_shape(O("a", 8, "N", 3, 4), O("b", 4, 5)) == (8, "N", 3, 5)
    with pytest.raises(TypeError_) as info:
        matmul_shape(O("x", "N", 784), O("W1", 748, 256))
    assert info.value.message == ("matmul: inner dimensions differ: x is f32[N, 784], "
                                  "W1 is f32[748, 256] (784 != 748)")
    with pytest.raises(TypeError_) as info:
        matmul_shape(O("x", "N", 3), O("W", 4, 3))
    assert info.value.hint == "did you mean x @ transpose(W)?"


def test_reshape_rules():
    assert reshape_shape(O("x", "N", 28, 28), [-1, 784]) == ("N", 784)
    assert reshape_shape(O("x", "N", 28, 28), ["N", 784]) == ("N", 784)
    assert reshape_shape(O("x", 4, 6), [-1, 3]) == (8, 3)
    for bad in ([-1, 783], [5, 5], [-1, -1], ["M", 784]):
        with pytest.raises(TypeError_):
            reshape_shape(O("x", "N", 28, 28), bad)


def test_symbolic_reshape_runs():
    x = randn(3, 2, 4)
    node = op_graph("reshape", [x], {"shape": (-1, 8)})
    assert node.outputs[0][1].shape == (3, 8)
    np.testing.assert_array_equal(run_op("reshape", [x], {"shape": (-1, 8)}), x.reshape(3, 8))


def test_reductions_and_axes():
    x = op_table.source("input", T("N", 10), name="x")
    assert op_table.apply("sum", [x], {"axis": 1}).shape == ("N",)
    assert op_table.apply("mean", [x], {"axis": 0, "keepdims": True}).shape == (1, 10)
    assert op_table.apply("max", [x]).shape == ()
    with pytest.raises(TypeError_, match=r"axis 2 is out of range for x \(f32\[N, 10\], 2 axes\)"):
        op_table.apply("sum", [x], {"axis": 2})


def test_dtype_rules():
    x = op_table.source("input", T("N", 3), name="x")
    y = op_table.source("input", T("N", dtype=DType.i64), name="y")
    with pytest.raises(TypeError_, match="add: dtypes differ"):
        op_table.apply("add", [x, op_table.source("input", T("N", 3, dtype=DType.f64), name="z")])
    with pytest.raises(TypeError_, match="exp: needs floating-point operands"):
        op_table.apply("exp", [y])
    assert op_table.apply("greater", [x, x]).dtype is DType.bool
    with pytest.raises(TypeError_, match="where: the condition must be bool"):
        op_table.apply("where", [x, x, x])


def test_nodes_are_immutable_and_structurally_equal():
    x = op_table.source("input", T("N", 3), name="x")
    a = op_table.apply("exp", [x])
    b = op_table.apply("exp", [x], name="other")
    assert a == b and hash(a) == hash(b)
    assert a != op_table.apply("log", [x])
    with pytest.raises(AttributeError):
        a.op = "log"


# --- random numbers and dropout -------------------------------------------------------------------

def _draw(key: int, shape, stream: int = 0, dtype: str = "f32") -> np.ndarray:
    k = op_table.source("input", TensorType(DType.i64, ()), name="k")
    graph = Graph("u", (("out", op_table.apply("uniform", [k], {"shape": shape, "stream": stream,
                                                               "dtype": dtype})),))
    return NumpyExecutor(graph).run({"k": np.int64(key)}, {}, {})["out"]


def test_uniform_is_a_pure_function_of_key_stream_and_index():
    a = _draw(5, (200, 50))
    assert a.dtype == np.float32 and a.shape == (200, 50)
    assert a.min() >= 0.0 and a.max() < 1.0
    np.testing.assert_array_equal(a, _draw(5, (200, 50)))
    # Element i does not depend on the shape it is drawn in: counters are flat indices.
    np.testing.assert_array_equal(a.ravel()[:1000], _draw(5, (1000,)))
    assert not np.array_equal(a, _draw(6, (200, 50)))
    assert not np.array_equal(a, _draw(5, (200, 50), stream=1))
    # f32 and f64 draws agree exactly (24-bit values), so masks match across precisions.
    np.testing.assert_array_equal(a, _draw(5, (200, 50), dtype="f64"))


def test_uniform_looks_uniform():
    a = _draw(1 << 40 | 3, (100_000,)).astype(np.float64)
    assert abs(a.mean() - 0.5) < 0.005 and abs(a.var() - 1 / 12) < 0.002
    counts = np.histogram(a, bins=10, range=(0, 1))[0]
    assert counts.min() > 9_500 and counts.max() < 10_500
    # neighbouring elements and neighbouring keys are uncorrelated
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.01
    b = _draw(1 << 40 | 4, (100_000,)).astype(np.float64)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01


def test_uniform_needs_an_integer_key():
    k = op_table.source("input", TensorType(DType.f32, ()), name="k")
    with pytest.raises(TypeError_, match="key must be an integer scalar"):
        op_table.apply("uniform", [k], {"shape": (3,)})


def test_training_dropout_matches_its_oracle_and_drops_about_p():
    x = np.ones((400, 250))
    graph = op_graph("dropout", [x], {"p": 0.3, "train": True, "stream": 2})
    lowered = run_pipeline(graph, PipelineOptions(verify=True))
    assert "#rng" in {n.attr["name"] for n in lowered.inputs}
    ex = NumpyExecutor(lowered)
    out = ex.run({"a0": x, "#rng": np.int64(9)}, {}, {})["out"]
    np.testing.assert_array_equal(out, OPS["dropout"].numpy(x, 0.3, 2, True, key=9))
    kept = out != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(out[kept], 1 / 0.7)          # inverted: kept units scaled up
    other = ex.run({"a0": x, "#rng": np.int64(10)}, {}, {})["out"]
    assert not np.array_equal(kept, other != 0)                # a new mask every step


def test_uniform_under_seed_zero_has_no_fixed_element():
    # A zero high key word (seed 0) once made element 0 of every draw exactly 0: always dropped.
    from graphc.runtime.program import rng_key
    firsts = [_draw(rng_key(0, step), (4,), stream)[0] for step in range(20) for stream in range(3)]
    assert min(firsts) > 0.0 and len(set(firsts)) == len(firsts)


def test_gelu_and_erf_gradients_match_finite_differences():
    from graphc.compiler import check_source
    from graphc.gradcheck import check_gradients
    source = """model m {
        input x: f32[N, 5]
        input y: i64[N]
        h = x -> linear(7) -> gelu -> linear(6) -> gelu(approximate="tanh") -> linear(3)
        output h
        loss = cross_entropy(h, y) + mean(erf(h))
    }"""
    _, results = check_gradients(check_source(source))
    assert all(r.ok for r in results), [r for r in results if not r.ok]
