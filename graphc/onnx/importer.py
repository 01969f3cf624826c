"""An ONNX model as a readable .nn file plus an .npz of its initializers (`graphc import`,
`graphc.compile_onnx`).

Every ONNX value becomes one of three things while the graph is walked in order: a tensor the
.nn model computes (`Value`, one statement per node), a constant known now (a numpy array:
initializers, `Constant`, and whatever only they feed, folded with onnx's reference evaluator),
or a shape that holds the symbolic batch size (an object array of ints and names, see
`import_ops.py`). Exporters' shape arithmetic (`Shape -> Gather -> Unsqueeze -> Concat ->
Reshape`) thus folds into a plain `reshape(x, [N, 9216])`. Constants that reach a tensor op as a
tensor become parameters, declared with `npz(...)` and stored in the .npz.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphc.errors import Diagnostic, GraphcError, error
from graphc.onnx import import_nn, import_ops  # noqa: F401  (they fill the handler table)
from graphc.onnx.import_fold import check_supported, convert
from graphc.onnx.import_types import DTYPES, NUMPY, ONNX_TYPE_NAMES, ImportError_, Value, number

LOSSES = ("cross_entropy", "nll", "mse", "none")


@dataclass
class Imported:
    """What `import_model` made: the .nn text, the arrays of its .npz, the model's name."""
    name: str
    source: str
    arrays: dict[str, np.ndarray]
    npz_name: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def sanitize(name: str) -> str:
    """An ONNX name as a .nn identifier: `/conv1/Conv_output_0` -> `conv1_Conv`,
    `onnx::Gemm_12` -> `Gemm_12`, `input.1` -> `input_1`."""
    name = re.sub(r"^onnx::", "", name)
    name = re.sub(r"_output_0(?=$|_)", "", name)
    name = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
    name = re.sub(r"_+", "_", name)
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = "v_" + name
    return name[:60]


def _reserved() -> frozenset[str]:
    from graphc.frontend.calls import CALLABLE_OPS, LAYERS
    from graphc.initializers import INITIALIZERS
    words = {"model", "train", "search", "def", "input", "param", "output", "loss", "as", "true",
             "false", "weights", "biases", "dropout", "N", "f32", "f64", "f16", "bf16", "i32", "i64",
             "bool"}
    return frozenset(words | set(CALLABLE_OPS) | set(LAYERS) | set(INITIALIZERS))


class Importer:
    def __init__(self, model, name: str, npz_name: str, source_name: str):
        self.model = model
        self.name = name
        self.npz_name = npz_name
        self.source_name = source_name
        self.reserved = _reserved()
        self.used: set[str] = set()
        self.env: dict[str, object] = {}
        self.origin: dict[str, str] = {}       # constant value -> the name its parameter takes
        self.param_of: dict[tuple[str, str], Value] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.input_lines: list[str] = []
        self.param_lines: list[str] = []
        self.body: list[str] = []
        self.consumers: dict[str, list] = {}
        self.pending: dict[str, tuple] = {}     # MatMul outputs waiting for their bias Add
        self.symbols: dict[str, str] = {}

    # --- names ---------------------------------------------------------------------------------
    def fresh(self, onnx_name: str) -> str:
        base = sanitize(onnx_name)
        if base in self.reserved:
            base = base + "_"
        name, k = base, 2
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def emit(self, onnx_name: str, expr: str, dtype: str, shape) -> Value:
        name = self.fresh(onnx_name)
        self.body.append(f"    {name} = {expr}")
        value = Value(name, dtype, tuple(shape))
        self.env[onnx_name] = value
        return value

    # --- operands --------------------------------------------------------------------------------
    def param(self, onnx_name: str, array: np.ndarray, key: str = "") -> Value:
        """A constant used as a tensor: a parameter initialized from the .npz (one per constant
        and layout; `key` tells layouts apart, e.g. a Gemm weight stored transposed)."""
        found = self.param_of.get((onnx_name, key))
        if found is not None:
            return found
        if array.dtype.kind != "f":
            raise ImportError_(f"the {array.dtype} constant '{onnx_name}' is used as a tensor; "
                               f"graphc parameters are floating point and constants scalars")
        dtype = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64",
                 np.dtype(np.float16): "f16"}.get(array.dtype)
        if dtype is None:
            raise ImportError_(f"constant '{onnx_name}' has dtype {array.dtype}")
        name = self.fresh(self.origin.get(onnx_name, onnx_name))
        shape = ", ".join(str(d) for d in array.shape)
        self.param_lines.append(f"    param {name}: {dtype}[{shape}] = npz(\"{self.npz_name}\")")
        self.arrays[name] = np.array(array, order="C")   # ascontiguousarray makes 0-d 1-d
        value = Value(name, dtype, tuple(array.shape))
        self.param_of[(onnx_name, key)] = value
        return value

    def tensor(self, onnx_name: str) -> Value:
        v = self.env[onnx_name]
        if isinstance(v, Value):
            return v
        if isinstance(v, np.ndarray) and v.dtype != object:
            return self.param(onnx_name, v)
        raise ImportError_(f"'{onnx_name}' is a shape that depends on the batch size; it is used "
                           f"as data, which graphc cannot express")

    def operand(self, onnx_name: str, like: Value | None) -> tuple[str, str, tuple]:
        """An operand's text, dtype and shape: a scalar constant next to a tensor is a literal."""
        v = self.env[onnx_name]
        if isinstance(v, np.ndarray) and v.dtype != object and v.size == 1 and like is not None \
                and v.ndim <= like.ndim and NUMPY.get(like.dtype) is not None \
                and np.dtype(NUMPY[like.dtype]) == v.dtype:
            return number(v.reshape(()).item(), like.dtype), like.dtype, (1,) * v.ndim
        t = self.tensor(onnx_name)
        return t.name, t.dtype, t.shape

    # --- the walk ---------------------------------------------------------------------------------
    def run(self, loss: str, data: str) -> Imported:
        graph = self.model.graph
        problems = check_supported(self.model)
        if problems:
            raise GraphcError([Diagnostic(p, file=self.source_name) for p in problems])
        onnx = __import__("onnx")
        init_names = set()
        for t in graph.initializer:
            self.env[t.name] = onnx.numpy_helper.to_array(t)
            init_names.add(t.name)
        for node in graph.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
        for out in graph.output:
            self.consumers.setdefault(out.name, []).append(None)
        inputs = [i for i in graph.input if i.name not in init_names]
        for i in inputs:
            self.declare_input(i)
        for node in graph.node:
            try:
                convert(self, node)
            except ImportError_ as err:
                raise error(f"{node.op_type} node '{node.name or node.output[0]}': {err}",
                            file=self.source_name) from None
        outputs = []
        for out in graph.output:
            v = self.env.get(out.name)
            if not isinstance(v, Value):
                v = self.tensor(out.name) if isinstance(v, np.ndarray) else None
            if v is None:
                raise error(f"output '{out.name}' is not computed by the graph", file=self.source_name)
            outputs.append(v)
        return self.finish(inputs, graph, outputs, loss, data)

    def declare_input(self, vi) -> None:
        tt = vi.type.tensor_type
        dtype = DTYPES.get(tt.elem_type)
        if dtype is None:
            raise error(f"input '{vi.name}' has type {ONNX_TYPE_NAMES.get(tt.elem_type, tt.elem_type)}"
                        f", which graphc does not have (f32, f64, f16, i32, i64, bool)",
                        file=self.source_name)
        shape = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            elif axis == 0:
                key = d.dim_param or "?"
                shape.append(self.symbols.setdefault(key, "N"))
            elif d.dim_param:
                shape.append(self.symbols.setdefault(d.dim_param, sanitize(d.dim_param).capitalize()))
            else:
                raise error(f"input '{vi.name}': axis {axis} has no size; graphc needs every size "
                            f"past the batch axis", file=self.source_name)
        name = self.fresh(vi.name)
        self.used.update(s for s in shape if isinstance(s, str))
        self.input_lines.append(f"    input {name}: {dtype}[{', '.join(map(str, shape))}]")
        self.env[vi.name] = Value(name, dtype, tuple(shape))

    def finish(self, inputs, graph, outputs: list[Value], loss: str, data: str) -> Imported:
        names, out_lines = [], []
        for out, v in zip(graph.output, outputs):
            if v.name == sanitize(out.name) and v.name not in names:
                out_lines.append(f"    output {v.name}")
                names.append(v.name)
            else:       # an output that is another's value, an input or a constant
                name = self.fresh(out.name)
                out_lines.append(f"    output {name} = {v.name}")
                names.append(name)
        loss_lines, train_lines = [], []
        if loss != "none":
            first = outputs[0]
            if loss in ("cross_entropy", "nll"):
                if first.ndim != 2 or not first.dtype.startswith("f") or first.shape[0] != "N":
                    raise error(f"--loss {loss} needs a first output of class scores "
                                f"f32[N, classes]; '{graph.output[0].name}' is "
                                f"{first.dtype}{list(first.shape)}", file=self.source_name)
                label = self.fresh("labels")
                self.input_lines.append(f"    input {label}: i64[N]")
            else:
                label = self.fresh("target")
                self.input_lines.append(
                    f"    input {label}: {first.dtype}[{', '.join(map(str, first.shape))}]")
            loss_lines = [f"    loss = {loss}({names[0]}, {label})"]
            train_lines = ["", "# a skeleton: set the data, the optimizer and the schedule to "
                           "fine-tune with", f"train {self.name} {{", f"    data      = {data}",
                           "    optimizer = adam(lr=1e-4)", "    batch     = 64",
                           "    epochs    = 1", "    seed      = 0", "}"]
        producer = f"{self.model.producer_name} {self.model.producer_version}".strip()
        opset = max((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")),
                    default=0)
        header = [f"# imported by graphc from {Path(self.source_name).name} ({producer or 'unknown'}"
                  f", opset {opset}); parameters from {self.npz_name}",
                  f"model {self.name} {{"]
        lines = header + self.input_lines + [""] + self.param_lines + [""] + self.body + [""] \
            + out_lines + loss_lines + ["}"] + train_lines
        return Imported(self.name, "\n".join(lines) + "\n", self.arrays, self.npz_name,
                        [line.split()[1].rstrip(":") for line in self.input_lines], names)


def import_model(model, name: str, source_name: str, loss: str = "none",
                 data: str = "npz(\"data.npz\")") -> Imported:
    """The .nn text and parameter arrays of an ONNX ModelProto; `name` names the model and its
    `NAME.npz`."""
    if loss not in LOSSES:
        raise error(f"unknown loss '{loss}': one of {', '.join(LOSSES)}")
    return Importer(model, name, f"{name}.npz", source_name).run(loss, data)


def model_name(path) -> str:
    name = sanitize(Path(path).stem)
    return name if name not in _reserved() else name + "_"
