"""Symbolic gradients against float64 central finite differences: every differentiable primitive
and composite, broadcasting, accumulation, stop_gradient, integer inputs, and the bundled models."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS, REPO

from graphc.autodiff import backward_graph
from graphc.backends.numpy.executor import NumpyExecutor
from graphc.compiler import check_source, lower, lower_derived, model_graph
from graphc.ir import ops as op_table
from graphc.ir.node import Graph
from graphc.ir.types import DType, TensorType

rng = np.random.default_rng(3)


def randn(*shape):
    return rng.standard_normal(shape)


def pos(*shape):
    return np.abs(rng.standard_normal(shape)) + 0.5


def grad_check(op: str, arrays: list[np.ndarray], attrs: dict | None = None, diff: tuple = None,
               eps: float = 1e-6, rtol: float = 1e-6, atol: float = 1e-8):
    """loss = sum(op(a0, a1, ...) * r) for a random r; derived gradients vs finite differences."""
    inputs = [op_table.source("input", TensorType(DType.from_numpy(a.dtype), a.shape), name=f"a{i}")
              for i, a in enumerate(arrays)]
    out = op_table.apply(op, inputs, attrs or {})
    r = op_table.source("input", TensorType(DType.f64, out.shape), name="r")
    loss = op_table.apply("sum", [op_table.apply("mul", [out, r])])
    diff = diff if diff is not None else [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    graph = lower_derived(backward_graph(lower(Graph(op, (("loss", loss),))),
                                 inputs=[f"a{i}" for i in diff]))
    ex = NumpyExecutor(graph)
    r_value = randn(*out.shape)

    def run(values):
        # "#rng" keys dropout masks in training graphs (ignored where no op draws random numbers).
        feeds = {f"a{i}": v for i, v in enumerate(values)} | {"r": r_value, "#rng": np.int64(11)}
        return ex.run(feeds, {}, {})

    derived = run(arrays)
    for i in diff:
        numeric = np.zeros_like(arrays[i])
        for idx in np.ndindex(arrays[i].shape):
            up = [a.copy() for a in arrays]
            down = [a.copy() for a in arrays]
            up[i][idx] += eps
            down[i][idx] -= eps
            numeric[idx] = (run(up)["loss"] - run(down)["loss"]) / (2 * eps)
        # An operand the result does not depend on (batch norm's given statistics in training)
        # gets no gradient output: its finite differences must then be zero.
        got = derived.get(f"grad a{i}", np.zeros_like(arrays[i]))
        np.testing.assert_allclose(got, numeric, rtol=rtol, atol=atol,
                                   err_msg=f"d loss / d a{i} of {op}")


LABELS = np.array([2, 0, 4, 1])
CASES = [
    ("add", [randn(4, 3), randn(3)], {}), ("sub", [randn(4, 1), randn(1, 5)], {}),
    ("mul", [randn(2, 3), randn(2, 3)], {}), ("div", [randn(3, 2), pos(2)], {}),
    ("pow", [pos(3), randn(3)], {}), ("maximum", [randn(5), randn(5)], {}),
    ("minimum", [randn(5), randn(5)], {}), ("neg", [randn(3)], {}), ("exp", [randn(3)], {}),
    ("log", [pos(3)], {}), ("log1p", [pos(3)], {}), ("sqrt", [pos(3)], {}),
    ("abs", [randn(6)], {}), ("tanh", [randn(4)], {}), ("sigmoid", [randn(4)], {}),
    ("relu", [randn(3, 4)], {}),
    ("where", [randn(4) > 0, randn(4), randn(4)], {}),
    ("cast", [randn(3)], {"dtype": "f64"}),
    ("matmul", [randn(3, 4), randn(4, 2)], {}), ("matmul", [randn(4), randn(4, 2)], {}),
    ("matmul", [randn(3, 4), randn(4)], {}), ("matmul", [randn(4), randn(4)], {}),
    ("matmul", [randn(2, 3, 4), randn(4, 5)], {}), ("matmul", [randn(4), randn(2, 4, 3)], {}),
    ("matmul", [randn(2, 3, 4), randn(4)], {}),
    ("sum", [randn(3, 4)], {"axis": 1}), ("sum", [randn(3, 4)], {}),
    ("mean", [randn(3, 4, 2)], {"axis": (0, 2), "keepdims": True}),
    ("max", [randn(3, 4)], {"axis": 1}),
    ("reshape", [randn(2, 6)], {"shape": (3, 4)}),
    ("transpose", [randn(2, 3, 4)], {"axes": (2, 0, 1)}), ("transpose", [randn(2, 3)], {}),
    ("concat", [randn(2, 3), randn(2, 2)], {"axis": 1}),
    ("broadcast_to", [randn(3, 1)], {"shape": (2, 3, 4)}),
    # composites, differentiated through their decompositions
    ("softmax", [randn(4, 5)], {"axis": 1}), ("log_softmax", [randn(4, 5)], {"axis": -1}),
    ("leaky_relu", [randn(6)], {"slope": 0.1}), ("prelu", [randn(3, 4), pos(4)], {}),
    ("elu", [randn(6) * 2], {"alpha": 0.7}), ("softplus", [randn(6) * 3], {"beta": 1.5}),
    ("swish", [randn(6) * 2], {}),
    ("layer_norm", [randn(3, 5) * 2 + 1, randn(5), randn(5)], {"eps": 1e-5}),
    ("layer_norm", [randn(2, 3, 5) * 2 + 1, randn(5)], {"eps": 1e-5}),       # without beta
    ("embedding", [np.array([[2, 0, 2], [1, 2, 2]]), randn(4, 3)], {}),   # repeated rows add up
    ("linear", [randn(3, 4), randn(4, 2), randn(2)], {}), ("flatten", [randn(2, 3, 2)], {}),
    ("mse", [randn(5), randn(5)], {}), ("nll", [randn(4, 5), LABELS], {}),
    ("cross_entropy", [randn(4, 5), LABELS], {}),
    ("binary_cross_entropy_with_logits", [randn(5) * 3, (randn(5) > 0).astype(float)], {}),
    ("l2", [randn(2, 3), randn(3)], {}), ("l1", [randn(4)], {}),
    ("dropout", [randn(4, 6)], {"p": 0.3, "train": True}), ("dropout", [randn(5)], {"p": 0.5}),
    ("erf", [randn(5)], {}), ("slice", [randn(3, 5)], {"axis": 1, "start": 1, "stop": 4}),
    ("gelu", [randn(6) * 2], {}), ("gelu", [randn(6) * 2], {"approximate": "tanh"}),
    ("window", [randn(2, 5, 6)], {"kernel": (2, 3), "stride": (2, 1), "dilation": (1, 2)}),
    ("window_add", [randn(2, 2, 2, 2, 3)], {"size": (5, 6), "kernel": (2, 3), "stride": (2, 1),
                                            "dilation": (1, 2)}),
    ("pad", [randn(2, 3)], {"low": (1, 0), "high": (2, 1), "value": 0.5}),
    # odd shapes: stride 2, padding, non-square kernels, groups, dilation; batch 1
    ("conv2d", [randn(2, 3, 7, 6), randn(4, 3, 3, 2), randn(4)], {"stride": 2, "padding": 1}),
    ("conv2d", [randn(1, 4, 6, 5), randn(2, 2, 2, 3)], {"groups": 2, "dilation": [2, 1]}),
    ("max_pool2d", [randn(2, 2, 7, 6)], {"kernel": 3, "stride": 2, "padding": 1}),
    ("avg_pool2d", [randn(1, 2, 5, 7)], {"kernel": [2, 3], "stride": [1, 2]}),
    ("batch_norm", [randn(5, 3), randn(3), randn(3), randn(3), pos(3)], {}),
    ("batch_norm", [randn(4, 2, 3, 2) * 2 + 1, randn(2), randn(2), randn(2), pos(2)], {"train": True}),
    ("running_stat", [randn(4, 2, 3, 2), randn(2)], {"stat": "var"}),
    ("all_reduce", [randn(2, 3)], {"op": "sum"}),       # one process (several: test_mpi.py)
    # sequence models: attention over [N, H, T, D] (causal, with dropout on its weights), masks,
    # a loss over every position
    ("causal_mask", [randn(2, 4, 4)], {"value": -3.0}),
    ("attention", [randn(2, 2, 4, 3), randn(2, 2, 4, 3), randn(2, 2, 4, 2)], {}),
    ("attention", [randn(2, 4, 3), randn(2, 5, 3), randn(2, 5, 2)], {"causal": False}),
    ("attention", [randn(2, 2, 4, 3), randn(2, 2, 4, 3), randn(2, 2, 4, 2)],
     {"dropout": 0.3, "train": True, "stream": 1}),
    ("cross_entropy", [randn(2, 3, 5), np.array([[2, 0, 4], [1, 1, 3]])], {}),
    ("matmul", [randn(2, 2, 3, 4), randn(2, 2, 4, 5)], {}), ("matmul", [randn(2, 2, 3, 4), randn(4, 5)], {}),
]


@pytest.mark.parametrize("op,arrays,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_gradient_matches_finite_differences(op, arrays, attrs):
    grad_check(op, arrays, attrs)


def test_every_differentiable_op_has_a_rule_and_a_case():
    from graphc.frontend.calls import CALLABLE_OPS
    from graphc.ir import OPS
    assert all(CALLABLE_OPS[n] is OPS[n] for n in CALLABLE_OPS)   # no stale snapshot of the table
    covered = {c[0] for c in CASES}
    for name, op in OPS.items():
        if op.kind in ("source", "random") or name in ("stop_gradient", "one_hot", "size") \
                or name in ("greater", "greater_equal", "less", "less_equal", "equal", "not_equal"):
            continue
        assert op.grad is not None or op.is_composite, f"{name} has no gradient rule"
        assert name in covered, f"{name} has no finite-difference test"


def _loss_graph(src: str):
    checked = check_source(src, "t.nn")
    return lower(model_graph(checked.pick(None)))


def test_accumulation_stop_gradient_and_integer_inputs():
    src = """model m { input x: f64[N, 3]
        input y: i64[N]
        param w: f64[3] = normal()
        h = x * w
        output h
        loss = mean(h * h + exp(h)) + sum(stop_gradient(w) * 100) + mean(cast(y, f64)) }"""
    bg = lower_derived(backward_graph(_loss_graph(src)))
    assert [name for name, _ in bg.outputs] == ["loss", "grad w"]
    x, y, w = randn(4, 3), np.array([0, 1, 2, 3]), randn(3)
    got = NumpyExecutor(bg).run({"x": x, "y": y}, {"w": w}, {"N": 4})["grad w"]
    h = x * w
    expected = ((2 * h + np.exp(h)) * x).sum(axis=0) / h.size
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_gradients_are_stable_at_large_inputs():
    src = """model m { input z: f64[N, 3]
        input y: i64[N]
        param s: f64[3] = ones()
        a = z * s
        output a
        loss = cross_entropy(a, y) + mean(tanh(a)) + mean(sigmoid(a)) }"""
    bg = lower_derived(backward_graph(_loss_graph(src), inputs=["z"]))
    z = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]])
    y = np.array([0, 2])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = NumpyExecutor(bg).run({"z": z, "y": y}, {"s": np.ones(3)}, {"N": 2})
    p = np.array([[1.0, 0, 0], [0, 1.0, 0]])               # softmax rows at +-1e4
    onehot = np.eye(3)[y]
    # tanh' and sigmoid' vanish at +-1e4 and are 1 and 1/4 at 0; each mean is over 6 elements.
    expected = (p - onehot) / 2 + (z == 0) * (1 + 0.25) / 6
    assert np.all(np.isfinite(out["grad z"]))
    np.testing.assert_allclose(out["grad z"], expected, atol=1e-12)


@pytest.mark.parametrize("path", MODELS, ids=[m.name for m in MODELS])
def test_model_gradients_match_finite_differences(path):
    """Every parameter of every bundled model, on a sample of its elements, in float64."""
    src = path.read_text().replace("f32", "f64")
    checked = check_source(src, str(path))
    ir = checked.pick(None)
    bg = lower_derived(backward_graph(lower(model_graph(ir))))
    fwd = NumpyExecutor(lower(model_graph(ir)))
    ex = NumpyExecutor(bg)
    feeds = {}
    for name, node in ir.inputs.items():
        shape = [5 if isinstance(d, str) else d for d in node.shape]
        feeds[name] = (rng.integers(0, 10, shape) if node.dtype.is_int else rng.random(shape))
    # Random parameters, but batch norm's running variance stays a variance (positive).
    params = {n: (np.ones(p.type.shape) if p.role == "stat" else rng.standard_normal(p.type.shape) * 0.3)
              for n, p in ir.params.items()}
    derived = ex.run(feeds, params, {"N": 5})
    eps = 1e-6
    # The CNNs' forward passes are costly in float64: fewer elements each (the conv ops have
    # their own finite-difference tests).
    samples = 12 if sum(v.size for v in params.values()) < 100_000 else 2
    for name, value in params.items():
        if ir.params[name].role == "stat":
            continue
        flat = list(np.ndindex(value.shape))
        for k in rng.choice(len(flat), size=min(samples, len(flat)), replace=False):
            idx = flat[k]
            up, down = dict(params), dict(params)
            up[name], down[name] = value.copy(), value.copy()
            up[name][idx] += eps
            down[name][idx] -= eps
            numeric = (fwd.run(feeds, up, {"N": 5})["loss"] -
                       fwd.run(feeds, down, {"N": 5})["loss"]) / (2 * eps)
            np.testing.assert_allclose(derived[f"grad {name}"][idx], numeric, rtol=1e-5,
                                       atol=1e-8, err_msg=f"{path.name}: d loss / d {name}{idx}")


def test_cli_prints_the_backward_graph(capsys, monkeypatch):
    from graphc.cli import main
    monkeypatch.chdir(REPO)
    assert main(["graph", "models/mnist_mlp.nn", "--backward"]) == 0
    out = capsys.readouterr().out
    assert "graph mnist_mlp.backward" in out
    for name in ("grad W1", "grad b1", "grad W2", "grad b2"):
        assert f"output {name} = %" in out
    assert "models/mnist_mlp.nn:11 (gradient)" in out     # the relu's line, tagged
    assert main(["graph", "models/mnist_mlp.nn", "--backward", "--format", "dot"]) == 0
    assert capsys.readouterr().out.startswith('digraph "mnist_mlp.backward"')
