"""ONNX export (graphc/onnx/export.py) checked against onnxruntime: every bundled model's forward
graph, the train steps of mnist_mlp and mnist_cnn, the fused patterns, preprocessing, refusals."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from graphc.api import compile_file, compile_source  # noqa: E402
from graphc.cli import main  # noqa: E402
from graphc.errors import GraphcError  # noqa: E402
from graphc.onnx import INSTALL_HINT  # noqa: E402
from graphc.onnx.export import build_model, export_onnx, random_feeds  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
BATCH = 3
RTOL = 1e-5


def _session(proto):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3      # the train step's parameters are inputs with defaults: a warning each
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _random_inputs(program, rng, batch=BATCH) -> dict[str, np.ndarray]:
    feeds = {}
    for node in program.graph.inputs:
        shape = tuple(batch if isinstance(d, str) else d for d in node.type.shape)
        if node.type.dtype.is_float:
            feeds[node.attr["name"]] = rng.standard_normal(shape).astype(node.type.dtype.numpy)
        else:
            feeds[node.attr["name"]] = rng.integers(0, 10, shape).astype(node.type.dtype.numpy)
    return feeds


def _close(got: np.ndarray, want: np.ndarray, rtol: float = RTOL) -> float:
    """The largest difference relative to the largest magnitude of `want` (normwise)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype)
    scale = max(float(np.max(np.abs(want))), 1e-30) if want.size else 1.0
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) / scale if want.size else 0.0
    assert diff <= rtol, f"relative difference {diff:.3g} > {rtol}"
    return diff


def _normwise(got: np.ndarray, want: np.ndarray, rtol: float = RTOL) -> float:
    """||got - want|| / ||want||: the measure for a train step's updated values, where Adam turns
    the float32 rounding of a gradient that is a near cancellation (the data term against the l2
    term) into an update of full size in that one element."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype)
    norm = float(np.linalg.norm(want.astype(np.float64)))
    diff = float(np.linalg.norm(got.astype(np.float64) - want)) / max(norm, 1e-30)
    assert diff <= rtol, f"normwise relative difference {diff:.3g} > {rtol}"
    return diff


def _ops(proto) -> set[str]:
    return {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.nn")), ids=lambda p: p.stem)
def test_forward_matches_onnxruntime_for_every_model(path):
    program = compile_file(path, seed=0)
    proto = build_model(program)
    onnx.checker.check_model(proto, full_check=True)
    inputs = _random_inputs(program, np.random.default_rng(0))
    want = program.forward(**inputs)
    got = _session(proto).run(None, inputs)
    assert [o.name for o in proto.graph.output] == list(want)
    for value, expected in zip(got, want.values()):
        _close(value, expected)
    # The batch axis stays symbolic, and parameters are initializers, not inputs.
    inits = {t.name for t in proto.graph.initializer}
    assert set(program.params) <= inits
    assert [i.name for i in proto.graph.input] == [n.attr["name"] for n in program.graph.inputs]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert all(n.doc_string.startswith(str(path)) for n in proto.graph.node if n.op_type != "Identity")


@pytest.mark.parametrize("model, fused", [
    ("mnist_mlp", {"Gemm", "LogSoftmax"}),
    ("digits_mlp", {"Gemm", "Softmax"}),
    ("mnist_cnn", {"Conv", "MaxPool", "Gemm", "LogSoftmax"}),
    ("fashion_cnn", {"Conv", "BatchNormalization", "MaxPool", "Gemm", "LogSoftmax"}),
])
def test_layers_become_their_onnx_ops(model, fused):
    proto = build_model(compile_file(MODELS / f"{model}.nn", seed=0))
    ops = _ops(proto)
    assert fused <= ops, ops
    # Nothing of the decompositions is left over: no sliding-window gathers, no Exp of softmax.
    assert not ops & {"Gather", "Exp", "ReduceMax", "Pad"}, ops


LAYERS_SOURCE = """
model layers {
    input x: f32[N, 2, 6, 6]
    h = x -> avg_pool(2) -> conv(3, 3, padding=1) -> flatten -> linear(16)
    g = gelu(h)
    t = gelu(h, approximate="tanh")
    output y = layernorm(g + t)
}
"""

EMBEDDING_SOURCE = """
model tokens {
    input t: i64[N, 5]
    output y = t -> embedding(11, 4) -> layernorm
}
"""


def test_layer_norm_without_bias_is_one_layer_normalization():
    program = compile_source(EMBEDDING_SOURCE.replace("layernorm", "layernorm(bias=false)"), seed=0)
    program.params["y.layernorm.gamma"][...] = np.linspace(0.5, 2, 4, dtype=np.float32)
    proto = build_model(program)
    onnx.checker.check_model(proto, full_check=True)
    (norm,) = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert len(norm.input) == 2 and not _ops(proto) & {"ReduceMean", "Sqrt", "Div"}, _ops(proto)
    t = np.random.default_rng(7).integers(0, 11, (3, 5))
    _close(_session(proto).run(None, {"t": t})[0], program.forward(t=t)["y"])


def test_embedding_is_a_gather():
    program = compile_source(EMBEDDING_SOURCE, seed=0)
    proto = build_model(program)
    onnx.checker.check_model(proto, full_check=True)
    assert {"Gather", "LayerNormalization"} <= _ops(proto) and "OneHot" not in _ops(proto)
    t = np.random.default_rng(7).integers(0, 11, (3, 5))
    _close(_session(proto).run(None, {"t": t})[0], program.forward(t=t)["y"])


@pytest.mark.parametrize("opset", [17, 20])
def test_layer_norm_gelu_and_avg_pool(opset):
    program = compile_source(LAYERS_SOURCE, seed=0)
    proto = build_model(program, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    ops = _ops(proto)
    assert {"LayerNormalization", "AveragePool", "Conv", "Gemm"} <= ops, ops
    assert ("Gelu" in ops) == (opset >= 20) and ("Erf" in ops) == (opset < 20), ops
    x = np.random.default_rng(1).standard_normal((4, 2, 6, 6)).astype(np.float32)
    _close(_session(proto).run(None, {"x": x})[0], program.forward(x=x)["y"])


def test_preprocessing_is_inside_the_exported_model():
    from graphc.ir.preprocess import Preprocessing
    program = compile_file(MODELS / "digits_mlp.nn", seed=0)
    rng = np.random.default_rng(2)
    mean, std = rng.uniform(0, 8, 64), rng.uniform(0.5, 4, 64)
    program.add_preprocessing(Preprocessing("x", "standardize", "float64", (0.0, 16.0), (-3.0, 3.0),
                                            mean=mean, std=std))
    import graphc
    proto = graphc.export_onnx(program)                   # the top-level API
    raw = rng.uniform(0, 16, (5, 64)).astype(np.float32)
    got = _session(proto).run(None, {"x": raw})[0]
    _close(got, program.forward(x=raw)["probs"])
    assert "graphc.preprocess" in {p.key for p in proto.metadata_props}
    # The model takes raw values: feeding them scaled gives something else.
    scaled = ((raw - mean) / std).astype(np.float32)
    assert not np.allclose(_session(proto).run(None, {"x": scaled})[0], got, atol=1e-3)


@pytest.mark.parametrize("model, batch, opset", [("mnist_mlp", 8, 17), ("mnist_cnn", 2, 17),
                                                  ("mnist_mlp", 8, 18), ("mnist_cnn", 2, 18)])
def test_five_train_steps_match_graphc(model, batch, opset):
    """Opset 17 takes dropout's draws as inputs, opset 18 computes them from the key #rng:
    either way the masks are graphc's."""
    program = compile_file(MODELS / f"{model}.nn", seed=3)
    proto = build_model(program, opset=opset, graph="train-step")
    names = [i.name for i in proto.graph.input]
    assert ("#rng" in names) == (opset >= 18)
    assert any(n.startswith("#uniform:") for n in names) == (opset < 18)
    onnx.checker.check_model(proto, full_check=True)
    assert not any(n.domain for n in proto.graph.node)          # standard ops only
    session = _session(proto)
    outputs = [o.name for o in proto.graph.output]
    contract = program.train_step_contract
    assert outputs == ["loss"] + [u.output for u in contract.updates]
    params = {k: np.array(v) for k, v in program.params.items()}
    state = {k: np.array(v) for k, v in program.state.items()}
    rng = np.random.default_rng(4)
    for step in range(5):
        x = rng.standard_normal((batch,) + tuple(program.graph.inputs[0].type.shape[1:])).astype(np.float32)
        y = rng.integers(0, 10, batch)
        feeds = {"x": x, "y": y, "#lr": np.array(program.lr, np.float32), **params, **state,
                 **random_feeds(proto, program.seed, step, {"N": batch})}
        assert set(feeds) == set(names)
        got = dict(zip(outputs, session.run(None, feeds)))
        loss = program.train_step(x=x, y=y)
        _close(got["loss"], np.asarray(loss, np.float32))
        for u in contract.updates:
            target = program.state if u.in_state else program.params
            _normwise(got[u.output], np.asarray(target[u.target]))
            (state if u.in_state else params)[u.target] = got[u.output]


def test_train_step_inputs_default_to_the_programs_values():
    program = compile_file(MODELS / "digits_logreg.nn", seed=0)
    proto = build_model(program, graph="train-step")
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input]
    assert inputs[:2] == ["x", "y"] and "#lr" in inputs and "W" in inputs and "#step" in inputs
    assert {"W", "b", "#step"} <= inits
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    y = np.arange(4)
    got = _session(proto).run(["loss"], {"x": x, "y": y, "#lr": np.array(0.05, np.float32)})[0]
    _close(got, np.asarray(program.train_step(x=x, y=y), np.float32))


def test_unsupported_content_is_one_error_at_its_location(monkeypatch):
    from graphc.onnx import lowering
    monkeypatch.delitem(lowering.HANDLERS, "tanh")
    with pytest.raises(GraphcError) as info:
        build_model(compile_file(MODELS / "digits_nesterov.nn", seed=0))
    text = str(info.value)
    assert "`tanh` has no ONNX lowering" in text
    assert "models/digits_nesterov.nn:7:" in text and "linear(64) -> tanh" in text and "^" in text


def test_bad_opset_and_graph_are_refused():
    program = compile_file(MODELS / "backprop_example.nn", seed=0)
    with pytest.raises(GraphcError, match="opset 16 is not supported"):
        build_model(program, opset=16)
    with pytest.raises(GraphcError, match="no train step"):
        build_model(program, graph="train-step")


def test_missing_onnx_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(GraphcError, match=r"pip install -e '\.\[onnx\]'") as info:
        export_onnx(MODELS / "mnist_mlp.nn")
    assert INSTALL_HINT in str(info.value)


def test_cli_export_and_errors(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(MODELS / "digits_logreg.nn"), "-o", str(out), "--graph", "train-step"]) == 0
    assert "exported digits_logreg (train-step, opset 17)" in capsys.readouterr().out
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert {o.name for o in proto.graph.output} >= {"loss", "new W", "new b"}
    assert main(["export", str(MODELS / "backprop_example.nn"), "-o", str(out), "--opset", "99"]) == 1
    err = capsys.readouterr().err
    assert "opset 99 is not supported" in err and "Traceback" not in err
    assert main(["export", str(tmp_path / "nothing"), "-o", str(out)]) == 1
    assert "no such .nn file, run folder or artifact folder" in capsys.readouterr().err
    assert main(["export", str(MODELS / "mnist_mlp.nn"), "-o", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_artifact_folder_exports_like_its_source(tmp_path):
    program = compile_file(MODELS / "mnist_cnn.nn", seed=0)
    program.save(tmp_path / "art")
    a = build_model(program)
    b = export_onnx(tmp_path / "art", tmp_path / "m.onnx")
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    assert (tmp_path / "m.onnx").read_bytes() == b.SerializeToString()


def test_model_and_seed_are_refused_for_a_folder(tmp_path, capsys):
    """--model and --seed pick and seed a .nn file's model; an artifact (or run) holds its own."""
    compile_file(MODELS / "digits_logreg.nn", seed=0).save(tmp_path / "art")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "art"), "-o", str(out), "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'art'}: --seed only applies to a .nn file" in err and "an artifact holds" in err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(GraphcError, match="--model only applies"):
        export_onnx(tmp_path / "art", model="digits_logreg")


def test_export_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: graphc export" in out and "--graph {forward,train-step}" in out


def test_train_step_at_a_newer_opset():
    """From opset 18 the reductions take their axes as an input: the step still matches."""
    program = compile_file(MODELS / "digits_nesterov.nn", seed=0)
    proto = build_model(program, opset=21, graph="train-step")
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(5).standard_normal((6, 64)).astype(np.float32)
    y = np.arange(6) % 10
    out = dict(zip([o.name for o in proto.graph.output],
                   _session(proto).run(None, {"x": x, "y": y, "#lr": np.array(0.05, np.float32)})))
    _close(out["loss"], np.asarray(program.train_step(x=x, y=y), np.float32))
    for u in program.train_step_contract.updates:
        target = program.state if u.in_state else program.params
        _normwise(out[u.output], np.asarray(target[u.target]))


def test_a_run_exports_its_trained_parameters_and_preprocessing(tmp_path, capsys):
    """`graphc export RUN`: the trained program with its fitted scaling; raw digits in."""
    import graphc
    from graphc.runtime.data import load_dataset, split
    run = tmp_path / "run"
    assert main(["train", str(MODELS / "digits_logreg.nn"), "--epochs", "1", "--out", str(run),
                 "--quiet", "--backend", "numpy"]) == 0
    assert main(["export", str(run), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "Sub 1" in capsys.readouterr().out           # the standardization's (x - mean) / std
    proto = onnx.load(str(tmp_path / "m.onnx"))
    trained = graphc.load_run(run, backend="numpy")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert np.array_equal(inits["W"], trained.params["W"]) and "x#mean" in inits
    x, _ = split(load_dataset(("digits", {})), 0.2, 0.2, 0)["test"]
    raw = np.asarray(x[:50], np.float32)
    _close(_session(proto).run(None, {"x": raw})[0], trained.forward(x=raw)["probs"])


@pytest.mark.parametrize("dtype", ["f32", "f16", "f64"])
def test_dropout_draws_computed_in_the_graph_are_graphcs_bit_for_bit(dtype):
    from onnx import helper, numpy_helper

    from graphc.ir import ops as op_table
    from graphc.ir.node import Graph
    from graphc.ir.types import DType, TensorType
    from graphc.onnx.lowering import Lowering
    key = op_table.source("input", TensorType(DType.i64, ()), name="#rng")
    x = op_table.source("input", TensorType(DType.f32, ("N", 3)), name="x")   # binds N
    u = op_table.apply("uniform", [key], {"shape": ("N", 7), "stream": 5, "dtype": dtype})
    graph = Graph("g", (("u", u), ("n", op_table.apply("size", [x], {"axis": 0}))))
    lw = Lowering(helper, numpy_helper, graph, 18, lambda node: node.attr["name"])
    outs = [lw.value(node) for _, node in graph.outputs]
    proto = helper.make_model(
        helper.make_graph(lw.nodes, "g", [helper.make_tensor_value_info("#rng", 7, []),
                                          helper.make_tensor_value_info("x", 1, ["N", 3])],
                          [helper.make_tensor_value_info(outs[0], {"f32": 1, "f16": 10, "f64": 11}[dtype],
                                                         ["N", 7]),
                           helper.make_tensor_value_info(outs[1], 1, [])],
                          initializer=lw.initializers),
        opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    draw = op_table.OPS["uniform"].numpy
    for k in (0, 12345, (7 << 32) | 3, 2**62 + 99):
        got = _session(proto).run([outs[0]], {"#rng": np.array(k, np.int64),
                                              "x": np.zeros((9, 3), np.float32)})[0]
        want = draw(np.int64(k), (9, 7), stream=5, dtype=dtype)
        assert got.dtype == want.dtype and np.array_equal(got, want), k


def test_activations_and_one_value_used_by_several_outputs():
    """elu, softplus (log1p), leaky_relu, swish, prelu decompose to where, minimum, abs, ...;
    an output that is an input, and two outputs of one value, get their own names."""
    program = compile_source("""
model m {
    input x: f32[N, 6]
    param a: f32[6] = constant(value=0.2)
    output y = concat(elu(x), softplus(x, beta=2.0), leaky_relu(x), swish(x), prelu(x, a), axis=1)
    output m = mean(abs(x))
    output same = x
    output z = x * 2.0
    output w = x * 2.0
}""", seed=0)
    proto = build_model(program)
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(6).standard_normal((5, 6)).astype(np.float32) * 4
    got = _session(proto).run(None, {"x": x})
    want = program.forward(x=x)
    assert [o.name for o in proto.graph.output] == list(want) == ["y", "m", "same", "z", "w"]
    for value, expected in zip(got, want.values()):
        _close(value, expected)


def test_train_steps_in_f64_agree_element_by_element():
    """In f64 the rounding that Adam amplifies in f32 is gone: five steps of mnist_mlp (dropout
    from the key #rng, opset 18) agree element by element to 1e-12. (onnxruntime has no f64
    Conv, so the CNN is compared in f32 only.)"""
    source = (MODELS / "mnist_mlp.nn").read_text().replace("f32", "f64")
    program = compile_source(source, seed=3, path=str(MODELS / "mnist_mlp.nn"))
    proto = build_model(program, opset=18, graph="train-step")
    session = _session(proto)
    outputs = [o.name for o in proto.graph.output]
    carry = {k: np.array(v) for k, v in {**program.params, **program.state}.items()}
    rng = np.random.default_rng(8)
    for step in range(5):
        x, y = rng.standard_normal((8, 784)), rng.integers(0, 10, 8)
        got = dict(zip(outputs, session.run(None, {
            "x": x, "y": y, "#lr": np.array(program.lr), **carry,
            **random_feeds(proto, program.seed, step, {"N": 8})})))
        _close(got["loss"], np.asarray(program.train_step(x=x, y=y)), rtol=1e-12)
        for u in program.train_step_contract.updates:
            target = program.state if u.in_state else program.params
            _close(got[u.output], np.asarray(target[u.target]), rtol=1e-12)
            carry[u.target] = got[u.output]


def test_every_primitive_is_lowered_a_source_or_refused_with_a_reason():
    """STYLE §11: the ONNX table covers the op table (a primitive added later, as `all_reduce`
    was, fails here instead of at a user's export)."""
    from graphc.ir import OPS
    from graphc.onnx.lowering import HANDLERS, SOURCES, UNSUPPORTED
    assert not set(HANDLERS) & set(UNSUPPORTED)
    assert all(isinstance(why, str) and why for why in UNSUPPORTED.values())
    missing = sorted(name for name, op in OPS.items() if op.kind != "composite"
                     and name not in HANDLERS and name not in SOURCES and name not in UNSUPPORTED)
    assert not missing, f"add these to lowering.HANDLERS or, with a reason, UNSUPPORTED: {missing}"


def test_a_train_step_built_for_ranks_exports_as_one_process():
    """A run trained with --ranks N saves a train step with an all-reduce: exported, it is the
    identity (the model runs as one process), and the step is the one-process step."""
    from graphc.api import build_program
    from graphc.compiler import check_source, read_source
    path = str(MODELS / "digits_logreg.nn")
    checked = check_source(read_source(path), path)
    two, one = build_program(checked, None, "numpy", ranks=2), build_program(checked, None, "numpy")
    proto = build_model(two, graph="train-step")
    assert "Identity" in _ops(proto)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 64)).astype(np.float32), np.arange(4)
    got = _session(proto).run(None, {"x": x, "y": y, "#lr": np.array(0.05, np.float32)})
    names = [o.name for o in proto.graph.output]
    one.lr = 0.05
    _close(got[names.index("loss")], np.asarray(one.train_step(x=x, y=y), np.float32))
    for u in one.train_step_contract.updates:
        target = one.state if u.in_state else one.params
        _close(got[names.index(u.output)], np.asarray(target[u.target]))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_error_location_in_a_fifo_or_device_does_not_hang(tmp_path, kind):
    """A loaded artifact names the .nn file of its nodes' locations; the error's source line is
    read from a regular file of bounded size only (a FIFO would block the open, /dev/zero
    would be read without end). In a subprocess, so a hang fails the test."""
    import os
    import subprocess
    path = tmp_path / "fifo"
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero")
    code = ("from graphc.errors import SourceLoc\nfrom graphc.ir.node import Node\n"
            "from graphc.ir.types import DType, TensorType\nfrom graphc.onnx.lowering import refuse\n"
            f"node = Node('tanh', (), (), TensorType(DType.f32, ()), SourceLoc({str(path)!r}, 1, 1))\n"
            "print(refuse(node, 'no').render())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}:1:1: error: cannot export to ONNX: no"), proc.stdout


def test_softmax_patterns_fuse_only_values_nothing_else_reads():
    """In the forward graph log_softmax is one LogSoftmax; in the train step the backward graph
    reads its exp and sum, so fusing would compute them twice: the decomposition alone is
    emitted (and the step still matches graphc, test_five_train_steps_match_graphc)."""
    program = compile_file(MODELS / "mnist_mlp.nn", seed=0)
    assert "LogSoftmax" in _ops(build_model(program))
    step = _ops(build_model(program, graph="train-step"))
    assert "LogSoftmax" not in step and {"Exp", "ReduceMax", "Log"} <= step
