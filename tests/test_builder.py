"""The front end's semantics: layers and the names of their parameters, parameter roles and the
`weights`/`biases` sets, pipelines, user functions, outputs, dims, train blocks and the Python API."""
from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc.compiler import check_source
from graphc.errors import GraphcError
from graphc.runtime.program import ProgramError


def params_of(src: str, model: str | None = None) -> dict[str, tuple]:
    checked = check_source(src, "t.nn")
    ir = checked.pick(model)
    return {n: (tuple(p.type.shape), p.role) for n, p in ir.params.items()}


def test_a_single_layer_takes_the_binding_name():
    src = """model m { input x: f32[N, 8]
        fc1 = x -> linear(4)
        fc2 = linear(fc1, 2, bias=false)
        output fc2 }"""
    assert params_of(src) == {"fc1.W": ((8, 4), "weight"), "fc1.b": ((4,), "bias"),
                              "fc2.W": ((4, 2), "weight")}


def test_several_layers_get_kind_named_scopes():
    src = """def block(x, n) = x -> linear(n) -> relu
    model m { input x: f32[N, 8]
        h = x -> block(6) -> block(5) -> linear(3) -> linear(2)
        h = h -> linear(2)
        output h }"""
    assert list(params_of(src)) == ["h.block.W", "h.block.b", "h.block_2.W", "h.block_2.b",
                                    "h.linear.W", "h.linear.b", "h.linear_2.W", "h.linear_2.b",
                                    "h_2.W", "h_2.b"]


def test_each_call_site_of_a_function_gets_its_own_parameters():
    src = """def mlp(x) = x -> linear(4) -> tanh -> linear(4)
    model m { input x: f32[N, 4]
        a = mlp(x)
        b = mlp(x)
        output a, b }"""
    p = graphc.compile_source(src)
    assert sorted(p.params) == ["a.linear.W", "a.linear.b", "a.linear_2.W", "a.linear_2.b",
                                "b.linear.W", "b.linear.b", "b.linear_2.W", "b.linear_2.b"]
    assert not np.array_equal(p.params["a.linear.W"], p.params["b.linear.W"])
    x = np.ones((2, 4), np.float32)
    out = p.forward(x=x)
    assert set(out) == {"a", "b"} and out["a"].shape == (2, 4)


def test_pipeline_passes_the_value_as_first_argument():
    src = """model m { input x: f32[N, 5]
        y = x -> softmax(axis=1) -> log
        output y }"""
    x = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    out = graphc.compile_source(src).forward(x=x)["y"]
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(out, np.log(e / e.sum(axis=1, keepdims=True)), rtol=1e-6)


def test_roles_are_inferred_from_uses_and_can_be_stated():
    src = """model m { input x: f32[N, 3]
        param A: f32[3, 4] = kaiming()
        param c: f32[4] = zeros()
        param s: f32[4] = ones()
        param g: f32[4] = ones() as weight
        h = (x @ A + c) * s * g
        output h }"""
    assert {k: v[1] for k, v in params_of(src).items()} == {
        "A": "weight", "c": "bias", "s": "other", "g": "weight"}


def test_weights_never_include_biases():
    src = """model m { input x: f32[N, 3]
        input y: i64[N]
        param W: f32[3, 2] = kaiming()
        param b: f32[2] = zeros()
        z = x @ W + b
        output z
        loss = cross_entropy(z, y) + l2(weights) + 0 * l1(biases) }"""
    checked = check_source(src, "t.nn")
    loss = checked.pick(None).loss
    from graphc.ir.node import topo_order
    l2 = [n for n in topo_order([loss]) if n.op == "l2"]
    assert [i.name for i in l2[0].inputs] == ["W"]


def test_weights_used_before_a_layer_exists_is_an_error():
    src = """model m { input x: f32[N, 3]
        g = x -> linear(3)
        r = l2(weights)
        h = g -> linear(2)
        output h }"""
    with pytest.raises(GraphcError, match="'weights' here does not include h.W"):
        check_source(src, "t.nn")
    with pytest.raises(GraphcError, match="'biases' is empty here: no bias parameter"):
        check_source(src.replace("r = l2(weights)", "r = l2(weights)\n q = l1(biases)")
                     .replace("g = x -> linear(3)", "g = x -> linear(3, bias=false)"), "t.nn")


def test_outputs_named_and_plain():
    src = """model m { input x: f32[N, 3]
        output x2 = x * 2, exp(x)
        output x }"""
    p = graphc.compile_source(src)
    assert p.outputs == ["x2", "output1", "x"]


def test_numbers_fold_and_take_the_tensor_dtype():
    src = """model m { input x: f64[N]
        y = x * (2 ** 3 - 6) + 1e-3
        output y }"""
    p = graphc.compile_source(src)
    out = p.forward(x=np.array([1.0, 2.0]))["y"]
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [2.001, 4.001])


def test_operator_precedence():
    src = """model m { input x: f64[N]
        a = -x ** 2
        b = 2 * x + 3 * x ** 2 / 3
        c = x - x - x
        output a, b, c }"""
    x = np.array([1.5, -2.0])
    out = graphc.compile_source(src).forward(x=x)
    np.testing.assert_allclose(out["a"], -x ** 2)
    np.testing.assert_allclose(out["b"], 2 * x + x ** 2)
    np.testing.assert_allclose(out["c"], -x)


def test_comparisons_and_where():
    src = """model m { input x: f32[N]
        y = where(x > 0, x, 0.5 * x)
        output y }"""
    out = graphc.compile_source(src).forward(x=np.array([-2.0, 3.0]))["y"]
    np.testing.assert_allclose(out, [-1.0, 3.0])


def test_several_models_need_a_choice():
    src = """model a { input x: f32[N]
        output x }
    model b { input x: f32[N]
        y = x * 2
        output y }"""
    with pytest.raises(GraphcError, match="holds 2 models"):
        graphc.compile_source(src)
    assert graphc.compile_source(src, model="b").outputs == ["y"]
    with pytest.raises(GraphcError, match="did you mean 'b'"):
        graphc.compile_source(src, model="bb")


def test_train_block_is_checked_and_resolved():
    src = """model m { input x: f32[N, 2]
        input y: f32[N, 2]
        output x
        loss = mse(x, y) }
    train m { data = digits; optimizer = sgd(0.1, momentum=0.9); batch = 32
              schedule = plateau(patience=3); early_stop = early_stop(5) }"""
    cfg = check_source(src, "t.nn").trains["m"]
    assert cfg.optimizer == ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": False,
                                     "weight_decay": 0.0, "dampening": 0.0})
    assert cfg.batch == 32 and cfg.epochs == 10 and cfg.seed == 0
    assert cfg.schedule.name == "plateau" and cfg.early_stop == ("early_stop",
                                                                 {"patience": 5, "on": "val_loss"})


# --- the Python API --------------------------------------------------------------------------------

SIMPLE = """model m { input x: f32[N, 3]
    input y: i64[N]
    param W: f32[3, 2] = kaiming()
    z = x @ W
    output z
    loss = cross_entropy(z, y) }"""


def test_params_is_a_live_checked_mapping():
    p = graphc.compile_source(SIMPLE)
    x = np.ones((2, 3), np.float32)
    p.params["W"] = np.ones((3, 2))                   # float64 in, stored as f32
    assert p.params["W"].dtype == np.float32
    np.testing.assert_allclose(p.forward(x=x)["z"], np.full((2, 2), 3.0))
    with pytest.raises(ProgramError, match=r"parameter W is f32\[3, 2\]; got an array of shape \[2, 3\]"):
        p.params["W"] = np.ones((2, 3))
    with pytest.raises(ProgramError, match="dtype int64"):
        p.params["W"] = np.ones((3, 2), dtype=np.int64)
    with pytest.raises(KeyError, match="did you mean 'W'"):
        p.params["w"] = np.ones((3, 2))
    assert list(p.params) == ["W"] and len(p.params) == 1


def test_forward_checks_its_inputs():
    p = graphc.compile_source(SIMPLE)
    assert list(p.inputs) == ["x"]                    # y feeds only the loss
    with pytest.raises(ProgramError, match="needs input 'x'"):
        p.forward()
    with pytest.raises(ProgramError, match="has no input 'X'; did you mean 'x'"):
        p.forward(X=np.ones((2, 3)))
    with pytest.raises(ProgramError, match=r"\(4 != 3 on axis 1\)"):
        p.forward(x=np.ones((2, 4), np.float32))
    with pytest.raises(ProgramError, match="dtype <U1|dtype str"):
        p.forward(x=np.array([["a", "b", "c"]]))


def test_symbolic_dims_unify_across_inputs():
    src = """model m { input a: f32[N, 2]
        input b: f32[N]
        c = sum(a, axis=1) + b
        output c }"""
    p = graphc.compile_source(src)
    assert p.forward(a=np.ones((3, 2)), b=np.ones(3))["c"].shape == (3,)
    with pytest.raises(ProgramError, match=r"but N is 3 \(from a\)"):
        p.forward(a=np.ones((3, 2)), b=np.ones(4))


def test_buffers_are_planned_once_per_batch_shape():
    p = graphc.compile_source(SIMPLE)
    ex = p._executors["forward"]
    first = p.forward(x=np.ones((2, 3), np.float32))["z"]
    kept = first.copy()
    p.forward(x=np.ones((2, 3), np.float32))
    p.forward(x=np.ones((5, 3), np.float32))
    assert len(ex.plans) == 2
    second = p.forward(x=np.zeros((2, 3), np.float32))["z"]
    np.testing.assert_array_equal(first, kept)       # outputs are copies, not planned buffers
    assert np.all(second == 0)


def test_flatten_and_reshape_keep_a_symbolic_batch():
    src = """model m { input x: f32[N, 2, 3]
        output f = flatten(x), r = reshape(x, [N, -1]), s = reshape(x, [N, 3, -1]) }"""
    p = graphc.compile_source(src)
    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    out = p.forward(x=x)
    np.testing.assert_array_equal(out["f"], x.reshape(4, 6))
    np.testing.assert_array_equal(out["r"], x.reshape(4, 6))
    np.testing.assert_array_equal(out["s"], x.reshape(4, 3, 2))
    with pytest.raises(GraphcError, match=r"hint: -1 would be 2\*N"):
        graphc.compile_source(src.replace("[N, 3, -1]", "[-1, 3]"))


def test_a_number_takes_the_dtype_of_the_values_not_of_a_condition():
    src = """model m { input x: f64[N]
        output y = where(x > 0, x, 0.5) }"""
    out = graphc.compile_source(src).forward(x=np.array([-1.0, 2.0]))["y"]
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [0.5, 2.0])


def test_outputs_of_inputs_are_not_copied_nodes():
    src = """model m { input x: f32[N]
        output a = x -> dropout(0), b = x }"""
    from graphc.compiler import model_graph
    graph = model_graph(check_source(src, "t.nn").pick(None))
    assert len(graph.nodes()) == 1 and [n for n, _ in graph.outputs] == ["a", "b"]


def test_runtime_is_reachable_from_the_package():
    import graphc as g
    assert g.runtime.load_artifact is g.load_artifact


def test_device_cuda_with_a_cpu_backend_is_refused():
    src = SIMPLE + "\ntrain m { optimizer = adam(lr=1e-3)\n device = cuda\n backend = llvm }\n"
    with pytest.raises(GraphcError, match="device = cuda, but backend = llvm runs on the CPU"):
        check_source(src, "m.nn")
    check_source(SIMPLE + "\ntrain m { optimizer = adam(lr=1e-3)\n device = cuda }\n", "m.nn")
