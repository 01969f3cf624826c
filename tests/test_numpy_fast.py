"""The numpy backend's fast calls (graphc/backends/numpy/calls.py): the numpy functions it calls directly
for the hot ops of a step, and the faster equal computations (relu's gradient select, one_hot),
give the op table's references' results bit for bit, alone and over whole training steps; and
the train step's per-call shortcuts (runtime/program.py) follow a changed learning rate."""
from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc.backends.numpy import executor as numpy_backend
from graphc.backends.numpy import updates as numpy_updates
from graphc.backends.numpy.calls import UFUNCS, fast_call
from graphc.backends.numpy.executor import NumpyExecutor
from graphc.errors import GraphcError
from graphc.ir import OPS
from graphc.ir import ops as op_table
from graphc.ir.node import Graph
from graphc.ir.types import DType, TensorType

rng = np.random.default_rng(3)
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1.5, 2.0], np.float32)


def _operand(shape=(4, 6)) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[:SPECIAL.size] = SPECIAL
    return x


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(f"u{x.itemsize}") if x.dtype.kind == "f" else x


@pytest.mark.parametrize("name", sorted(UFUNCS))
def test_direct_calls_give_the_references_bits(name):
    op = OPS[name]
    args = [_operand(), _operand()[::-1]][:op.arity]
    if name == "matmul":
        args = [rng.standard_normal((4, 6)).astype(np.float32),
                rng.standard_normal((6, 3)).astype(np.float32)]
    with np.errstate(all="ignore"):
        want = op.numpy(*args)
        got = UFUNCS[name](*args)
        into = UFUNCS[name](*args, out=np.empty_like(want))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(_bits(into), _bits(want))


def test_relu_gradient_select_is_np_where_bit_for_bit():
    """where(c, g, 0) runs as a bit mask: NaN, inf and -0.0 in g come through as np.where has it,
    with c a view (not contiguous) and the result written over g."""
    g = _operand((8, 6))
    c = (_operand((6, 8)) > 0).T
    zero = np.zeros((), np.float32)
    template = [None, None, zero]
    fn, ins, _, writes = fast_call(op_table.apply("where", [_input("c", 8, 6, dtype="bool"),
                                                            _input("g", 8, 6), _zero()], {}),
                                   (0, 1, 2), {}, [(8, 6)] * 3, (8, 6), template, output=False)
    assert writes and ins == (0, 1) and fn.func.__name__ == "_select_or_zero"
    want = np.where(c, g, zero)
    np.testing.assert_array_equal(_bits(fn(c, g, out=np.empty_like(g))), _bits(want))
    np.testing.assert_array_equal(_bits(fn(c, g.copy(), out=g)), _bits(want))
    np.testing.assert_array_equal(_bits(OPS["where"].numpy(c, g, zero)), _bits(want))


def _input(name, *shape, dtype="f32"):
    return op_table.source("input", TensorType(DType(dtype), shape), name=name)


def _zero():
    return op_table.source("const", TensorType(DType.f32, ()), value=0.0)


def _hot_graph(depth=5):
    y, x = _input("y", "N", dtype="i64"), _input("x", "N", depth)
    hot = op_table.apply("one_hot", [y], {"depth": depth, "dtype": "f32"})
    return Graph("t", (("out", op_table.apply("mul", [hot, x], {})),))


def test_one_hot_labels_and_their_range_check():
    ex = NumpyExecutor(_hot_graph())
    x = np.ones((6, 5), np.float32)
    for labels in ([0, 4, 2, 2, 1, 3], []):
        y = np.array(labels, np.int64)
        got = ex.run({"y": y, "x": x[:len(y)]}, {}, {"N": len(y)})["out"]
        np.testing.assert_array_equal(got, OPS["one_hot"].numpy(y, depth=5, dtype="f32"))
    for bad in (-1, 5, np.iinfo(np.int64).min):
        y = np.array([0, bad, 1, 2, 3, 4], np.int64)
        with pytest.raises(GraphcError, match=f"class label {bad} is out of range"):
            ex.run({"y": y, "x": x}, {}, {"N": 6})


def _reference_calls(node, ins, kwargs, shapes, shape, template, output, scalar):
    op = OPS[node.op]
    return op.numpy, ins, kwargs, op.numpy_out


@pytest.mark.parametrize("path", ["models/mnist_mlp.nn", "models/digits_adamw.nn",
                                  "models/digits_rmsprop.nn"])
def test_training_with_and_without_fast_calls_is_bit_identical(path, monkeypatch):
    fast = graphc.compile_file(path)
    with monkeypatch.context() as m:
        m.setattr(numpy_backend, "fast_call", _reference_calls)
        m.setattr(numpy_backend, "scalar_nodes", lambda *args: set())
        m.setattr(numpy_updates, "UFUNCS", {})
        plain = graphc.compile_file(path)
        (name, ttype), = fast.inputs.items()
        classes = fast.graphs["forward"].output_map[fast.outputs[0]].shape[-1]
        for _ in range(3):
            batch = {name: rng.random((16, *ttype.shape[1:]), dtype=np.float32),
                     "y": rng.integers(0, classes, 16)}
            assert fast.train_step(**batch) == plain.train_step(**batch)
    for key in plain.params:
        np.testing.assert_array_equal(_bits(fast.params[key]), _bits(plain.params[key]), key)
    for key in plain.state:
        np.testing.assert_array_equal(_bits(fast.state[key]), _bits(plain.state[key]), key)


def test_a_changed_learning_rate_is_used_at_once():
    a, b = graphc.compile_file("models/digits_mlp.nn"), graphc.compile_file("models/digits_mlp.nn")
    batch = {"x": rng.random((16, 64), dtype=np.float32), "y": rng.integers(0, 10, 16)}
    a.lr = b.lr = 0.05
    a.train_step(**batch)
    b.train_step(**batch)
    a.lr = 0.01
    a.train_step(**batch)
    b.train_step(**batch)
    fed = a._lr_array()
    assert fed == np.float32(0.01) and not fed.flags.writeable
    assert any(not np.array_equal(a.params[k], b.params[k]) for k in a.params)


def test_names_from_an_artifact_never_become_code(tmp_path, monkeypatch):
    """The numpy backend runs a plan as generated Python; names reach it only as string literals.
    An artifact whose parameter name reads as Python statements (hashes recomputed, as an attacker
    would) loads and trains without running them. (The canary is a bare file name: load_artifact
    refuses names holding a path separator before the backend sees them.)"""
    import hashlib
    import io
    import json

    from graphc.runtime import load_artifact
    art, canary = tmp_path / "art", tmp_path / "pwned"
    graphc.compile_file("models/digits_mlp.nn").save(art)
    # A name with no path separator (the loader refuses those): the canary is relative to the
    # working folder.
    monkeypatch.chdir(tmp_path)
    old, bad = "logits.linear.W", "W'] ; open('pwned', 'w') ; x = params['W"
    graph = (art / "graph.json").read_text().replace(json.dumps(old), json.dumps(bad))
    (art / "graph.json").write_text(graph)
    manifest = json.loads((art / "manifest.json").read_text())
    for p in manifest["params"]:
        p["name"] = bad if p["name"] == old else p["name"]
    for u in manifest["train_step"]["updates"]:          # the train step's contract names it too
        u["target"], u["param"] = (bad if v == old else v for v in (u["target"], u["param"]))
    with np.load(art / "params.npz") as z:
        arrays = {(bad if k == old else k): z[k] for k in z.files}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (art / "params.npz").write_bytes(buffer.getvalue())
    for name in ("graph.json", "params.npz"):
        manifest["files"][name] = hashlib.sha256((art / name).read_bytes()).hexdigest()
    (art / "manifest.json").write_text(json.dumps(manifest))
    program = load_artifact(art)
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
    assert program.forward(x=x)["probs"].shape == (4, 10)
    assert np.isfinite(program.train_step(x=x, y=y)) and bad in program.params
    assert not canary.exists()
