"""The reference evaluator (graphc/ir/reference.py): a graph node by node with the op table's numpy
references, each value checked against its node's type; constant folding computes with it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from graphc import passes
from graphc.ir import OPS
from graphc.ir import ops as op_table
from graphc.ir.node import Graph
from graphc.ir.reference import evaluate, evaluate_node
from graphc.ir.types import DType, TensorType


def inp(name, *shape, dtype="f32"):
    return op_table.source("input", TensorType(DType(dtype), shape), name=name)


def test_evaluates_a_graph_with_symbolic_sizes_params_and_state():
    x, w = inp("x", "N", 3), op_table.source("param", TensorType(DType.f32, (3, 2)), name="w")
    m = op_table.source("state", TensorType(DType.f32, ()), name="m")
    h = op_table.apply("matmul", [x, w])
    y = op_table.apply("reshape", [op_table.apply("mul", [h, m])], {"shape": ("N", 2, 1)})
    rng = np.random.default_rng(0)
    xs, ws = rng.standard_normal((5, 3)).astype(np.float32), np.ones((3, 2), np.float32)
    out = evaluate(Graph("t", (("y", y), ("h", h))), {"x": xs}, {"w": ws}, {"N": 5},
                   {"m": np.float32(2)})
    np.testing.assert_array_equal(out["y"], (np.matmul(xs, ws) * np.float32(2)).reshape(5, 2, 1))
    assert out["h"].dtype == np.float32 and not np.shares_memory(out["h"], xs)


def test_a_reference_that_disagrees_with_the_ops_rules_is_an_internal_error(monkeypatch):
    wrong = dataclasses.replace(OPS["exp"], numpy=lambda x, out=None: np.exp(x.astype(np.float64)))
    monkeypatch.setitem(OPS, "exp", wrong)
    graph = Graph("t", (("y", op_table.apply("exp", [inp("x", 2)])),))
    with pytest.raises(AssertionError, match=r"internal error: the numpy reference of exp gave "
                                             r"float64\[2\] where .* is float32\[2\]"):
        evaluate(graph, {"x": np.zeros(2, np.float32)}, {})


def test_constant_folding_computes_with_the_evaluator():
    c = [op_table.source("const", TensorType(DType.f32, ()), value=v) for v in (0.1, 0.2)]
    node = op_table.apply("add", c)
    folded = passes.fold_constants(Graph("t", (("y", node),))).output_map["y"]
    assert folded.op == "const"
    want = evaluate_node(node, [np.float32(0.1), np.float32(0.2)])
    assert np.float32(folded.attr["value"]) == want and want.dtype == np.float32
