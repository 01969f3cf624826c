"""The ONNX round trip (issue 19): a model exported (graphc.export_onnx, `graphc export`) and
imported back (graphc.compile_onnx, `graphc import`) computes the original's forward, to float32
rounding, for the bundled models (batch norm, convolutions, pooling, layers) and for embedding,
layer norm, gelu, average pooling and the activations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from graphc import export_onnx  # noqa: E402
from graphc.api import compile_file, compile_onnx, compile_source  # noqa: E402
from graphc.cli import main  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
BATCH = 3
RTOL = 1e-5

SOURCES = {
    "layers": """
model layers {
    input x: f32[N, 2, 6, 6]
    h = x -> avg_pool(2) -> conv(3, 3, padding=1) -> flatten -> linear(16)
    output y = layernorm(gelu(h) + gelu(h, approximate="tanh"))
}
""",
    "embedding": """
model tokens {
    input t: i64[N, 5]
    output y = t -> embedding(11, 4) -> layernorm
}
""",
    "unbiased_layernorm": """
model tokens {
    input t: i64[N, 5]
    output y = t -> embedding(11, 4) -> layernorm(bias=false)
}
""",
    "activations": """
model m {
    input x: f32[N, 6]
    param a: f32[6] = constant(value=0.2)
    output y = concat(elu(x), softplus(x, beta=2.0), leaky_relu(x), swish(x), prelu(x, a), axis=1)
    output m = mean(abs(x))
    output z = x * 2.0
}
""",
}


def _perturbed(program, rng):
    """Parameters away from their initial values (zero biases, batch norm's running mean 0 and
    variance 1 would hide a swapped or dropped term)."""
    for name, value in list(program.params.items()):
        noise = rng.standard_normal(value.shape).astype(value.dtype)
        program.params[name] = (np.abs(value) + 0.5 + 0.2 * np.abs(noise)
                                if name.endswith("running_var") else value + 0.1 * noise)
    return program


def _inputs(program, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for node in program.graph.inputs:
        shape = tuple(BATCH if isinstance(d, str) else d for d in node.type.shape)
        dtype = node.type.dtype
        feeds[node.attr["name"]] = (rng.standard_normal(shape).astype(dtype.numpy) if dtype.is_float
                                    else rng.integers(0, 11, shape).astype(dtype.numpy))
    return feeds


def _same_forward(original, imported, rng) -> None:
    feeds = _inputs(original, rng)
    want, got = original.forward(**feeds), imported.forward(**feeds)
    assert list(got) == list(want)
    for name, value in want.items():
        value, other = np.asarray(value), np.asarray(got[name])
        assert other.shape == value.shape and other.dtype == value.dtype, name
        scale = max(float(np.max(np.abs(value))), 1e-30)
        diff = float(np.max(np.abs(other.astype(np.float64) - value))) / scale
        assert diff <= RTOL, f"{name}: relative difference {diff:.3g} > {RTOL}"


@pytest.mark.parametrize("model", ["digits_mlp", "mnist_mlp", "mnist_cnn", "fashion_cnn",
                                   "mnist_layers", "backprop_example"])
def test_bundled_models_round_trip(model, tmp_path):
    rng = np.random.default_rng(0)
    original = _perturbed(compile_file(MODELS / f"{model}.nn", seed=0), rng)
    proto = export_onnx(original, tmp_path / "m.onnx")
    fused = {"digits_mlp": {"Gemm", "Softmax"}, "mnist_mlp": {"LogSoftmax"},
             "mnist_cnn": {"Conv", "MaxPool"}, "fashion_cnn": {"Conv", "BatchNormalization"}}
    assert fused.get(model, set()) <= {n.op_type for n in proto.graph.node}
    _same_forward(original, compile_onnx(tmp_path / "m.onnx"), rng)


@pytest.mark.parametrize("name,opset", [(name, 17) for name in sorted(SOURCES)] + [("layers", 20)])
def test_patterns_round_trip(name, opset, tmp_path):
    """Gather (embedding), LayerNormalization, AveragePool, Conv, Gemm, gelu (Erf/Tanh at opset
    17, Gelu at 20) and the activations' decompositions, exported and read back."""
    rng = np.random.default_rng(1)
    original = _perturbed(compile_source(SOURCES[name], seed=0), rng)
    proto = export_onnx(original, tmp_path / "m.onnx", opset=opset)
    ops = {n.op_type for n in proto.graph.node}
    assert {"layers": {"Conv", "AveragePool", "LayerNormalization", "Gemm"},
            "embedding": {"Gather", "LayerNormalization"},
            "unbiased_layernorm": {"Gather", "LayerNormalization"}}.get(name, set()) <= ops, ops
    assert opset < 20 or "Gelu" in ops
    imported = compile_onnx(tmp_path / "m.onnx")
    assert len(imported.params) == len(original.params)      # no parameter made up on the way back
    _same_forward(original, imported, rng)


def test_cli_round_trip_on_numpy_and_llvm(tmp_path, capsys):
    """`graphc export` then `graphc import`, the imported .nn compiled on numpy and on llvm."""
    source = MODELS / "fashion_cnn.nn"
    assert main(["export", str(source), "-o", str(tmp_path / "f.onnx")]) == 0
    assert main(["import", str(tmp_path / "f.onnx"), "-o", str(tmp_path / "imported")]) == 0
    assert "wrote" in capsys.readouterr().out
    (nn,) = (tmp_path / "imported").glob("*.nn")
    for backend in ("numpy", "llvm"):
        rng = np.random.default_rng(2)
        _same_forward(compile_file(source, backend=backend), compile_file(nn, backend=backend), rng)
