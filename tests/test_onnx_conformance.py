"""ONNX's node conformance suite (the cases the onnx wheel builds in memory) on graphc, through
graphc/onnx/backend.py, on the numpy and llvm backends: every case of every op graphc claims
passes, or is excluded below with the reason.

llvm runs every case except the `_expanded` ones (the op's ONNX function body, imported into the
same graphc primitives the op itself lowers to, which numpy runs), to keep the file's time down."""
from __future__ import annotations

import importlib
import io
import re
import warnings
from functools import cache

import numpy as np
import pytest

pytest.importorskip("onnx")

from graphc.errors import GraphcError  # noqa: E402

# op -> (the onnx module that builds its cases, the regex of its case names)
OPS = {
    "Gemm": ("gemm", r"^test_gemm_"), "MatMul": ("matmul", r"^test_matmul_"),
    "Add": ("add", r"^test_add"), "Sub": ("sub", r"^test_sub"), "Mul": ("mul", r"^test_mul"),
    "Div": ("div", r"^test_div"), "Relu": ("relu", r"^test_relu"),
    "Sigmoid": ("sigmoid", r"^test_sigmoid"), "Tanh": ("tanh", r"^test_tanh"),
    "Exp": ("exp", r"^test_exp"), "Log": ("log", r"^test_log(_|$)"), "Sqrt": ("sqrt", r"^test_sqrt"),
    "Erf": ("erf", r"^test_erf"), "Softmax": ("softmax", r"^test_softmax_"),
    "LogSoftmax": ("logsoftmax", r"^test_logsoftmax_"), "Conv": ("conv", r"^test_conv_"),
    "MaxPool": ("maxpool", r"^test_maxpool_"), "AveragePool": ("averagepool", r"^test_averagepool_"),
    "BatchNormalization": ("batch_normalization", r"^test_batchnorm_"),
    "LayerNormalization": ("layernormalization", r"^test_layer_normalization_"),
    "Gelu": ("gelu", r"^test_gelu_"), "Flatten": ("flatten", r"^test_flatten_"),
    "Reshape": ("reshape", r"^test_reshape_"), "Transpose": ("transpose", r"^test_transpose_"),
    "Concat": ("concat", r"^test_concat_"), "Dropout": ("dropout", r"^test_(training_)?dropout(_|$)"),
}

_NO_DTYPE = "graphc has no {} dtype (f16, f32, f64, i32, i64 and bool only)"
EXCLUDED = {
    r"_int8$": _NO_DTYPE.format("int8"), r"_int16$": _NO_DTYPE.format("int16"),
    r"_uint(8|16|32|64)$": _NO_DTYPE.format("unsigned"),
    r"^test_div_int32_trunc$": "integer division: graphc's / is for floating point only",
    r"^test_maxpool_2d_uint8$": _NO_DTYPE.format("uint8"),
    r"^test_maxpool_with_argmax_": "MaxPool's second output (the argmax Indices): graphc's "
                                   "pools return the values only",
    r"^test_batchnorm_.*_training_mode$": "BatchNormalization with training_mode=1 returns the "
                                          "updated running statistics as outputs; graphc updates "
                                          "them inside its train step instead",
    r"^test_reshape_allowzero_reordered$": "a reshape to an axis of size 0: graphc sizes are at "
                                           "least 1",
    r"^test_dropout_default_mask": "Dropout's mask output: graphc's dropout returns the values only",
    r"^test_training_dropout": "Dropout in training mode: graphc draws its masks from its own "
                               "counter-based generator, not numpy's (the cases' expected output)",
}


@cache
def cases() -> dict[str, list]:
    """The node cases of each op, built by the onnx wheel (only the modules of these ops)."""
    import onnx.backend.test.case.node as node_cases
    for module, _ in OPS.values():
        importlib.import_module(f"onnx.backend.test.case.node.{module}")
    found: dict[str, list] = {op: [] for op in OPS}
    for case in node_cases._NodeTestCases:
        for op, (_, pattern) in OPS.items():
            if re.search(pattern, case.name):
                found[op].append(case)
                break
    return found


def exclusion(name: str) -> str | None:
    return next((why for pattern, why in EXCLUDED.items() if re.search(pattern, name)), None)


def run_case(backend, case) -> None:
    from onnx.backend.test.runner import Runner
    rep = backend.prepare(case.model)
    for inputs, outputs in case.data_sets:
        got = rep.run([np.asarray(i) for i in inputs])
        Runner.assert_similar_outputs([np.asarray(o) for o in outputs], got, case.rtol, case.atol)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("op", list(OPS))
def test_node_cases(op, backend, capsys):
    from graphc.onnx.backend import GraphcBackend, LLVMBackend
    if backend == "llvm":
        pytest.importorskip("llvmlite")
    runner = LLVMBackend if backend == "llvm" else GraphcBackend
    passed, excluded, failed = 0, 0, []
    for case in cases()[op]:
        if exclusion(case.name):
            excluded += 1
            continue
        if backend == "llvm" and "_expanded" in case.name:
            continue
        try:
            run_case(runner, case)
            passed += 1
        except (GraphcError, AssertionError) as err:
            text = err.render() if isinstance(err, GraphcError) else str(err)
            failed.append(f"{case.name}: {text.splitlines()[0][:300]}")
    with capsys.disabled():
        print(f"\nonnx {op} on {backend}: {passed} passed, {excluded} excluded, "
              f"{len(failed)} failed of {len(cases()[op])} cases")
    assert not failed, "\n".join(failed)
    assert passed > 0


def test_every_exclusion_is_used_and_every_op_has_cases():
    names = [c.name for op in OPS for c in cases()[op]]
    for op in OPS:
        assert cases()[op], f"no onnx node case matches {op}"
    for pattern in EXCLUDED:
        assert any(re.search(pattern, n) for n in names), f"exclusion {pattern} matches no case"


def test_an_unclaimed_op_is_refused_with_one_message_per_op():
    from onnx import TensorProto, helper

    from graphc.onnx.importer import import_model
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Selu", ["x"], ["a"], name="s1"),
             helper.make_node("Selu", ["a"], ["b"], name="s2"),
             helper.make_node("Softmax", ["b"], ["y"], name="sm", axis=1, bogus=3)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    with pytest.raises(GraphcError) as err:
        import_model(model, "m", "m.onnx")
    text = err.value.render()
    assert "ONNX op Selu is not supported: graphc lacks the op itself (2 nodes: s1, s2)" in text
    assert "ONNX op Softmax is not supported: graphc lacks the attribute bogus (1 node: sm)" in text
    assert text.count("error:") == 2


def test_the_backend_runs_under_onnx_backendtest():
    """The same backend through onnx's own runner (as onnxruntime's and tinygrad's tests use it)."""
    import unittest

    import onnx.backend.test

    from graphc.onnx.backend import GraphcBackend
    cases()     # the op modules first: BackendTest adds the rest of onnx's node cases
    with warnings.catch_warnings():   # onnx's other op modules overflow casts building their cases
        warnings.simplefilter("ignore")
        runner = onnx.backend.test.BackendTest(GraphcBackend, __name__)
    runner.include(r"^test_(gemm|conv|flatten)_.*_cpu$")
    suite = unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromTestCase(case)
                               for case in runner.test_cases.values())
    result = unittest.TextTestRunner(stream=io.StringIO()).run(suite)
    ran = result.testsRun - len(result.skipped)
    assert result.wasSuccessful() and ran == len(cases()["Gemm"]) + len(cases()["Conv"]) + len(
        cases()["Flatten"])
