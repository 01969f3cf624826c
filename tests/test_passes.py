"""The optimization passes (each rewrite on a small graph: what it removes, and the same numbers as
the unoptimized graph on the numpy backend), the pipeline with verification on every bundled
model's program graphs, and the numpy executor against the reference evaluator (graphc.ir.reference)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import MODELS, REPO

from graphc import passes
from graphc.backends.numpy.executor import NumpyExecutor
from graphc.compiler import check_source, program_graphs
from graphc.errors import SourceLoc
from graphc.ir import OPS
from graphc.ir import ops as op_table
from graphc.ir.node import Graph, Node
from graphc.ir.ops import Operand
from graphc.ir.reference import evaluate
from graphc.ir.shapes import normalize_axes
from graphc.ir.types import DType, TensorType, bind_shape
from graphc.passes import PIPELINE, PipelineOptions, run_pipeline

rng = np.random.default_rng(7)
VERIFY = PipelineOptions(verify=True)
AFTER = PipelineOptions(verify=True, stage=passes.Stage.AFTER_AUTODIFF)
REFERENCE = [(name, fn) for name, fn in PIPELINE if name in ("decompose", "cse")]
GRAD = frozenset({"gradient"})


def inp(name: str, *shape, dtype: str = "f32") -> Node:
    return op_table.source("input", TensorType(DType(dtype), shape), name=name)


def c(value, dtype: str = "f32") -> Node:
    return op_table.source("const", TensorType(DType(dtype), ()), value=value)


def ap(op: str, *inputs: Node, tags=frozenset(), **attrs) -> Node:
    return op_table.apply(op, inputs, attrs, tags=tags)


def graph_of(out: Node) -> Graph:
    return Graph("t", (("out", out),))


def computed_ops(graph: Graph) -> list[str]:
    return sorted(n.op for n in graph.nodes() if OPS[n.op].kind != "source")


def work(graph: Graph) -> int:
    """Ops a run computes: `size` is a function of the batch shape, computed once per plan, and
    a mean is a sum and a division."""
    return sum({"size": 0, "mean": 2}.get(op, 1) for op in computed_ops(graph))


def feeds_for(graph: Graph, dims: dict[str, int]) -> dict[str, np.ndarray]:
    feeds = {}
    for n in graph.inputs:
        shape = bind_shape(n.shape, dims)
        if n.dtype.is_float:   # positive, so that log, sqrt and exp(log(x)) stay in their domain
            feeds[n.attr["name"]] = (rng.random(shape) + 0.5).astype(n.dtype.numpy)
        else:
            feeds[n.attr["name"]] = rng.integers(0, 2, shape).astype(n.dtype.numpy)
    return feeds


def run(graph: Graph, feeds: dict, dims: dict | None = None) -> np.ndarray:
    return NumpyExecutor(graph).run(feeds, {}, dims or {})["out"]


# --- each rewrite: what it removes, and the numbers it keeps ----------------------------------------

X, Y = inp("X", 3, 4), inp("Y", 3, 4)
S = inp("s", )
I = inp("I", 3, 4, dtype="i64")  # noqa: E741
HOT = ap("one_hot", inp("labels", 3, dtype="i64"), depth=4)


def _tagged_mean():
    # A graph holding gradients may say `size` of a live value: mean over the symbolic N.
    x = inp("Xn", "N", 4)
    return ap("mul", ap("mean", x, axis=0), c(1.0), tags=GRAD)


# (id, output node, the computed ops left after the whole pipeline, exact?)
REWRITES = [
    ("x*1", ap("mul", X, c(1.0)), [], True),
    ("1*x", ap("mul", c(1.0), X), [], True),
    ("x+0", ap("add", X, c(0.0)), [], True),
    ("0+x", ap("add", c(0.0), X), [], True),
    ("x-0", ap("sub", X, c(0.0)), [], True),
    ("0-x", ap("sub", c(0.0), X), ["neg"], True),
    ("x/1", ap("div", X, c(1.0)), [], True),
    ("x*-1", ap("mul", X, c(-1.0)), ["neg"], True),
    ("neg(neg(x))", ap("neg", ap("neg", X)), [], True),
    ("exp(log(x))", ap("exp", ap("log", X)), [], False),
    ("log(exp(x))", ap("log", ap("exp", X)), [], False),
    ("x+x", ap("add", X, X), ["mul"], True),
    ("(x+y)+y", ap("add", ap("add", X, Y), Y), ["add", "mul"], False),
    ("-x+y", ap("add", ap("neg", X), Y), ["sub"], True),
    ("x-(-y)", ap("sub", X, ap("neg", Y)), ["add"], True),
    ("x/4", ap("div", X, c(4.0)), ["mul"], True),
    ("(x*3)*5", ap("mul", ap("mul", X, c(3.0)), c(5.0)), ["mul"], False),
    ("(x/3)/5", ap("div", ap("div", X, c(3.0)), c(5.0)), ["div"], False),
    ("(x*s)/3", ap("div", ap("mul", X, S), c(3.0)), ["div", "mul"], False),
    ("(3/x)... kept", ap("mul", ap("div", c(3.0), X), c(5.0)), ["div", "mul"], True),
    ("-(x*s)", ap("neg", ap("mul", X, S)), ["mul", "neg"], True),
    ("-(x-y)", ap("neg", ap("sub", X, Y)), ["sub"], True),
    ("x-x float kept", ap("sub", X, X), ["sub"], True),
    ("x-x int", ap("sub", I, I), ["broadcast_to"], True),
    ("x*0 float kept", ap("mul", X, c(0.0)), ["mul"], True),
    ("x*0 int", ap("mul", I, c(0, "i64")), ["broadcast_to"], True),
    ("max(x,x)", ap("maximum", X, X), [], True),
    ("relu(relu(x))", ap("relu", ap("relu", X)), ["relu"], True),
    ("cast to own dtype", ap("cast", X, dtype="f32"), [], True),
    ("pow(x,1)", ap("pow", X, c(1.0)), [], True),
    ("mean -> sum/count", ap("mean", X, axis=0), ["div", "sum"], True),
    ("mean -> sum*(1/4)", ap("mean", X, axis=1), ["mul", "sum"], True),
    ("mean over N kept", ap("mean", inp("Xn", "N", 4), axis=0), ["mean"], True),
    ("mean over N, differentiated", _tagged_mean(), ["div", "size", "sum"], True),
    ("op(broadcast_to(b), y)", ap("add", ap("broadcast_to", inp("b", 4), shape=(3, 4)), Y),
     ["add"], True),
    ("op(reshape(b), y)", ap("mul", ap("reshape", inp("b", 4), shape=(1, 4)), Y), ["mul"], True),
    ("op(broadcast_to(s), 2)", ap("mul", ap("broadcast_to", S, shape=(3, 4)), c(2.0)),
     ["broadcast_to", "mul"], True),
    ("gradient seed", ap("mul", ap("broadcast_to", ap("reshape", ap("neg", c(1.0)), shape=(1, 1)),
                                   shape=(3, 4)), X), ["neg"], True),
    ("reshape(reshape(x))", ap("reshape", ap("reshape", X, shape=(12,)), shape=(2, 6)),
     ["reshape"], True),
    ("reshape to own shape", ap("reshape", X, shape=(3, 4)), [], True),
    ("reshape(sum keepdims)", ap("reshape", ap("sum", X, axis=(0,), keepdims=True), shape=(4,)),
     ["sum"], True),
    ("transpose(transpose(x))", ap("transpose", ap("transpose", X)), [], True),
    ("transposes composed", ap("transpose", ap("transpose", inp("Z", 2, 3, 4), axes=(1, 0, 2)),
                               axes=(0, 2, 1)), ["transpose"], True),
    ("broadcast_to(broadcast_to(x))", ap("broadcast_to", ap("broadcast_to", inp("b", 4),
                                                             shape=(3, 4)), shape=(2, 3, 4)),
     ["broadcast_to"], True),
    ("folded scalars", ap("mul", X, ap("add", c(0.1), c(0.2))), ["mul"], True),
    ("sum(one_hot(y)*s) over classes", ap("sum", ap("mul", HOT, S), axis=1), ["broadcast_to"],
     True),
    ("sum(s*one_hot(y)) keepdims", ap("sum", ap("mul", S, HOT), axis=-1, keepdims=True),
     ["broadcast_to"], True),
    ("sum(one_hot(y)*s) over rows kept", ap("sum", ap("mul", HOT, S), axis=0),
     ["mul", "one_hot", "sum"], True),
    ("sum(one_hot(y)*x) kept", ap("sum", ap("mul", HOT, X), axis=1), ["mul", "one_hot", "sum"],
     True),
]


@pytest.mark.parametrize("out, left, exact", [r[1:] for r in REWRITES], ids=[r[0] for r in REWRITES])
def test_rewrite(out, left, exact):
    graph = graph_of(out)
    # A case whose output is tagged `gradient` stands for a derived graph: the compiler lowers
    # those in the after-autodiff stage.
    derived = "gradient" in out.tags
    optimized = run_pipeline(graph, AFTER if derived else VERIFY)
    assert computed_ops(optimized) == sorted(left)
    assert work(optimized) <= work(run_pipeline(graph, VERIFY, REFERENCE))
    dims = {"N": 5}
    feeds = feeds_for(graph, dims)
    want = run(run_pipeline(graph, VERIFY, REFERENCE), feeds, dims)
    got = run(optimized, feeds, dims)
    assert got.dtype == want.dtype and got.shape == want.shape
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_reassociation_leaves_a_shared_sum_alone():
    inner = ap("add", X, Y)
    graph = Graph("t", (("out", ap("add", inner, Y)), ("inner", inner)))
    assert computed_ops(run_pipeline(graph, VERIFY)) == ["add", "add"]


def test_factor_chain_touches_the_large_operand_once():
    big = inp("W", 784, 256)
    lr, bias = inp("lr"), inp("bias")
    out = ap("mul", ap("div", ap("mul", big, c(0.1)), bias), lr)   # ((W * 0.1) / bias) * lr
    optimized = run_pipeline(graph_of(out), VERIFY)
    large = [n.op for n in optimized.nodes() if n.shape == (784, 256) and n.op != "input"]
    assert large == ["mul"]


def test_rewrites_keep_name_location_and_tags():
    loc = SourceLoc("m.nn", 3, 5, 3, 9)
    inner = op_table.apply("mul", [X, c(3.0)])
    out = op_table.apply("mul", [inner, c(5.0)], loc=loc, name="h", tags=frozenset({"update"}))
    new = passes.simplify(graph_of(out)).output_map["out"]
    assert new.op == "mul" and new.inputs[0] is X
    assert (new.name, new.loc, new.tags) == ("h", loc, frozenset({"update"}))
    folded = passes.fold_constants(graph_of(op_table.apply("add", [c(1.0), c(2.0)], loc=loc,
                                                           name="k"))).output_map["out"]
    assert (folded.op, folded.attr["value"], folded.name, folded.loc) == ("const", 3.0, "k", loc)


def test_log_softmax_replaces_log_of_softmax():
    z = inp("z", 2, 3)
    out = ap("log", ap("softmax", z, axis=1))
    assert computed_ops(passes.simplify_composites(graph_of(out))) == ["log_softmax"]
    # Where softmax underflows to 0 the original says -inf; the rewrite gives the true value.
    logits = np.array([[0.0, 200.0, -200.0], [1.0, 2.0, 3.0]], np.float32)
    got = run(run_pipeline(graph_of(out), VERIFY), {"z": logits})
    s = logits - logits.max(axis=1, keepdims=True)
    want = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with np.errstate(divide="ignore"):
        plain = run(run_pipeline(graph_of(out), VERIFY, REFERENCE), {"z": logits})
    assert np.isneginf(plain).any()


@pytest.mark.parametrize("op, args, dtype, want", [
    ("add", [(0.1, "f32"), (0.2, "f32")], np.float32, np.float32(0.1) + np.float32(0.2)),
    ("mul", [(3, "i64"), (7, "i64")], np.int64, 21),
    ("less", [(1.0, "f64"), (2.0, "f64")], np.bool_, True),
    ("sqrt", [(2.0, "f16")], np.float16, np.sqrt(np.float16(2.0))),
    ("cast", [(2.75, "f32")], np.int32, 2),
])
def test_fold_constants_is_exact_in_the_node_dtype(op, args, dtype, want):
    attrs = {"dtype": "i32"} if op == "cast" else {}
    node = ap(op, *[c(v, d) for v, d in args], **attrs)
    folded = passes.fold_constants(graph_of(node)).output_map["out"]
    assert folded.op == "const" and folded.type == node.type
    value = np.asarray(folded.attr["value"], dtype)
    assert value == want and value.dtype == dtype


def test_fold_constants_leaves_tensors_and_non_finite_values():
    splat = ap("broadcast_to", c(2.0), shape=(1000, 1000))
    assert passes.fold_constants(graph_of(splat)).output_map["out"].op == "broadcast_to"
    log0 = ap("log", c(0.0))
    assert passes.fold_constants(graph_of(log0)).output_map["out"].op == "log"
    key = ap("uniform", c(3, "i64"), shape=(), dtype="f32")
    assert passes.fold_constants(graph_of(key)).output_map["out"].op == "uniform"


def test_stop_gradient_is_dropped_only_once_differentiated():
    """The pipeline's stage, set by the compiler driver, decides; not the nodes' tags."""
    x = inp("x", 3)
    drop = [("drop_stop_gradient", dict(PIPELINE)["drop_stop_gradient"])]
    kept = graph_of(ap("add", ap("stop_gradient", x), x, tags=GRAD))
    assert "stop_gradient" in computed_ops(run_pipeline(kept, VERIFY, drop))
    dropped = graph_of(ap("add", ap("stop_gradient", x), x))
    assert "stop_gradient" not in computed_ops(run_pipeline(dropped, AFTER, drop))


def test_dead_code_needs_no_pass():
    """A graph is its outputs' ancestors, so a node a rewrite orphans is gone: no DCE pass."""
    orphan = ap("neg", X)
    simplified = passes.simplify(graph_of(ap("neg", orphan)))
    assert all(n is not orphan for n in simplified.nodes()) and simplified.output_map["out"] is X


def test_verify_catches_a_pass_that_breaks_an_invariant():
    def mistyped(graph: Graph) -> Graph:      # claims a shape the rules do not give
        x = graph.output_map["out"]
        bad = Node("neg", (x,), (), TensorType(DType.f32, (99,)))
        return Graph(graph.name, (("out", bad),), graph.mode)

    graph = graph_of(ap("exp", X))
    assert run_pipeline(graph, PipelineOptions(), [("mistyped", mistyped)])   # unverified: passes
    with pytest.raises(AssertionError, match="internal error: .*neg"):
        run_pipeline(graph, VERIFY, [("mistyped", mistyped)])


# --- the pipeline on every bundled model ------------------------------------------------------------

@contextlib.contextmanager
def pipeline(chosen):
    saved = list(PIPELINE)
    PIPELINE[:] = chosen
    try:
        yield
    finally:
        PIPELINE[:] = saved


def model_graphs(path, chosen=None):
    checked = check_source(path.read_text(), str(path))
    ir = checked.pick(None)
    with pipeline(chosen if chosen is not None else list(PIPELINE)):
        graphs, state, train_step = program_graphs(ir, checked.trains.get(ir.name), VERIFY)
    updates = {"train_step": train_step.updates} if train_step else {}
    return graphs, state, ir, updates


def random_run_args(graph: Graph, state_info: dict, ir, batch: int):
    dims = {"N": batch}
    feeds = {}
    for n in graph.inputs:
        name, shape = n.attr["name"], bind_shape(n.shape, dims)
        if name == "#rng":
            feeds[name] = np.int64(12345)
        elif name == "#lr":
            feeds[name] = np.asarray(1e-3, n.dtype.numpy)
        elif n.dtype.is_int:
            feeds[name] = rng.integers(0, 2, shape).astype(n.dtype.numpy)
        else:
            feeds[name] = rng.standard_normal(shape).astype(n.dtype.numpy)
    params = {name: (0.1 * rng.standard_normal(bind_shape(p.type.shape, {})))
              .astype(p.type.dtype.numpy) for name, p in ir.params.items()}
    for name, p in ir.params.items():
        if p.role == "stat":     # batch norm's running statistics: a variance is positive
            params[name] = np.abs(params[name]) + params[name].dtype.type(0.5)
    state = {}
    for name, info in state_info.items():
        shape = bind_shape(info.type.shape, {})
        state[name] = (np.asarray(5, info.type.dtype.numpy) if name == "#step" else
                       (0.01 * rng.random(shape)).astype(info.type.dtype.numpy))
    return feeds, params, dims, state


def graph_size(graph: Graph) -> int:
    """Nodes, a `mean` over a known count counted as the two the simplifier makes of it on purpose
    (sum, then a division: backends have one reduction less), and constants not at all."""
    def known_count(n: Node) -> bool:
        x = n.inputs[0]
        axes = normalize_axes("mean", Operand(x.type, ""), n.attr["axis"])
        return all(isinstance(x.shape[a], int) for a in axes)
    return sum(0 if n.op == "const" else 2 if n.op == "mean" and known_count(n) else 1
               for n in graph.nodes())


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_pipeline_keeps_every_program_graph_within_1e6(path):
    optimized, state_info, ir, updates = model_graphs(path)
    plain, _, _, _ = model_graphs(path, REFERENCE)
    batch_norm = any(p.role == "stat" for p in ir.params.values())
    for key, graph in optimized.items():
        assert len(graph.nodes()) <= len(plain[key].nodes()), key
        feeds, params, dims, state = random_run_args(graph, state_info, ir, batch=6)
        want = evaluate(plain[key], feeds, params, dims, state)
        got = NumpyExecutor(graph, updates.get(key, ())).run(feeds, params, dims, state)
        assert got.keys() == want.keys()
        # Batch norm's backward subtracts batch means of products: in f32 that cancellation leaves
        # gradient elements (a bias before batch norm has none at all) far below the gradients'
        # scale, where reassociation shows. There, errors are measured against that scale.
        scale = max(float(np.max(np.abs(v), initial=0.0)) for v in want.values()) if batch_norm else 0.0
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=max(1e-12, 1e-5 * scale),
                                       err_msg=f"{path.name} {key} {name}")


def test_pipeline_never_grows_the_gpt():
    """The GPT (too large for the numeric comparison above; its numerics are checked against
    PyTorch in test_gpt) is mostly layer norms, whose means the simplifier splits: its graphs
    do not grow by the measure above, and the training ones shrink."""
    optimized, _, _, _ = model_graphs(REPO / "models/shakespeare_gpt.nn")
    plain, _, _, _ = model_graphs(REPO / "models/shakespeare_gpt.nn", REFERENCE)
    for key, graph in optimized.items():
        assert graph_size(graph) <= graph_size(plain[key]), key
    for key in ("loss_and_grads", "train_step"):
        assert graph_size(optimized[key]) < graph_size(plain[key]), key


def test_pipeline_shrinks_the_mnist_train_step():
    optimized, _, _, _ = model_graphs(REPO / "models/mnist_mlp.nn")
    plain, _, _, _ = model_graphs(REPO / "models/mnist_mlp.nn", REFERENCE)
    before, after = plain["train_step"].nodes(), optimized["train_step"].nodes()
    assert len(after) < len(before) - 10
    ops = [n.op for n in after]
    assert "stop_gradient" not in ops and "mean" not in ops
    # The l2 gradient is one product of W1, not 1e-4 broadcast, multiplied, then added twice.
    w1 = [n for n in after if n.shape == (784, 256) and n.op in ("mul", "add", "broadcast_to")]
    assert sum(n.op == "broadcast_to" for n in w1) == 0


# --- the numpy executor against the reference evaluator (graphc/ir/reference.py) ----------------------

@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_executor_matches_node_by_node_evaluation_bit_for_bit(path):
    graphs, state_info, ir, updates = model_graphs(path)
    for key, graph in graphs.items():
        ex = NumpyExecutor(graph, updates.get(key, ()))
        handed_out = []
        for batch in (4, 7, 4):                  # plans per batch shape, buffers reused
            feeds, params, dims, state = random_run_args(graph, state_info, ir, batch)
            saved = {k: np.array(v) for k, v in {**feeds, **params, **state}.items()}
            got = ex.run(feeds, params, dims, state)
            want = evaluate(graph, feeds, params, dims, state)
            for name in want:
                assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{key} {name}")
                for owned in (*feeds.values(), *params.values(), *state.values()):
                    assert not np.shares_memory(got[name], owned), f"{key} {name} aliases an input"
            for k, v in {**feeds, **params, **state}.items():
                np.testing.assert_array_equal(v, saved[k], err_msg=f"{key}: {k} was written to")
            # Updated parameters and state (`new X`) are the executor's storage, written in
            # place by later runs (numpy_updates.py); every other result is the caller's.
            kept = {k: v for k, v in got.items() if not k.startswith("new ") or v.ndim == 0}
            handed_out.append(({k: np.array(v) for k, v in kept.items()}, kept))
        for snapshot, got in handed_out:         # later runs never write into earlier results
            for name in snapshot:
                np.testing.assert_array_equal(got[name], snapshot[name])


def test_executor_outputs_of_one_node_are_distinct_arrays():
    x = inp("x", 3)
    e = ap("exp", x)
    graph = Graph("t", (("a", e), ("b", e), ("c", x), ("d", ap("reshape", e, shape=(3, 1)))))
    out = NumpyExecutor(graph).run({"x": np.ones(3, np.float32)}, {}, {})
    assert not np.shares_memory(out["a"], out["b"]) and not np.shares_memory(out["a"], out["d"])
    assert out["c"] is not None and out["c"].flags.writeable


def _f32_elementwise() -> list[str]:
    """Elementwise ops with `out=` whose result on f32 operands is f32 (not the comparisons)."""
    names = []
    for name, op in sorted(OPS.items()):
        if op.kind == "elementwise" and op.numpy_out and not any(
                spec.required for key, spec in op.attrs.items() if key != "dtype"):
            arity = op.arity if isinstance(op.arity, int) else op.arity[0]
            attrs = {"dtype": "f32"} if "dtype" in op.attrs else {}
            node = op_table.apply(name, [inp(f"a{k}", 3, 4) for k in range(arity)], attrs)
            if node.dtype is DType.f32:
                names.append(name)
    return names


@pytest.mark.parametrize("name", _f32_elementwise())
def test_elementwise_references_may_write_over_an_operand(name):
    """The executor reuses a dying operand's buffer as `out` of an elementwise op."""
    op = OPS[name]
    arity = op.arity if isinstance(op.arity, int) else op.arity[0]
    attrs = {"dtype": "f32"} if "dtype" in op.attrs else {}
    arrays = [(rng.random((3, 4)) + 0.5).astype(np.float32) for _ in range(arity)]
    want = op.numpy(*arrays, out=np.empty((3, 4), np.float32), **attrs)
    for k in range(arity):
        operands = [a.copy() for a in arrays]
        got = op.numpy(*operands, out=operands[k], **attrs)
        np.testing.assert_array_equal(got, want, err_msg=f"{name} over operand {k}")
