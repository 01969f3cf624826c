"""`graphc export`: a program's forward graph (the inference graph, preprocessing included) or its
whole train step as an ONNX model of standard ops (docs/onnx.md).

The forward graph takes the model's inputs (the batch axis symbolic) and holds the parameters as
initializers. The train step takes the batch, every trained parameter, the optimizer state (the
step count `#step` included) and the learning rate `#lr`, and returns the loss and each updated
value under the train step's own output names (`new W1`, `new W1#exp_avg`, `new #step`); the
inputs other than the batch and the learning rate carry the program's current values as
initializers, so a runtime may leave them out. Dropout's random numbers (graphc's counter-based
`uniform` draws, which ONNX cannot reproduce with its standard ops) are inputs `#uniform:STREAM`;
`random_feeds` computes graphc's own draws for a step, so that the exported step and graphc's
take the same masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from graphc.errors import error
from graphc.ir.contract import LR_INPUT, RNG_INPUT, rng_key
from graphc.ir.node import Graph, Node
from graphc.ir.types import bind_shape
from graphc.onnx import require_onnx
from graphc.onnx.lowering import ONNX_DTYPES, Lowering, refuse
from graphc.onnx.patterns import PATTERNS
from graphc.version import __version__

DEFAULT_OPSET = 17
MIN_OPSET = 17
GRAPHS = ("forward", "train-step")
UNIFORM_PREFIX = "#uniform:"
MAX_PROTO_BYTES = 2**31 - 1       # protobuf's limit on one message (no external data here)


def export_onnx(source, out=None, *, opset: int = DEFAULT_OPSET, graph: str = "forward",
                model: str | None = None, seed: int | None = None):
    """The ONNX model (an `onnx.ModelProto`) of `source`: a `Program`, a run folder (its trained
    parameters and input preprocessing), an artifact folder, or a `.nn` file (`model` and `seed`
    as for `compile_file`). `graph` is "forward" (inference) or "train-step". With `out`, the
    model is also written there."""
    require_onnx()              # the install hint before any compiling
    program = _program(source, model, seed)
    proto = build_model(program, opset=opset, graph=graph)
    if out is not None:
        save(proto, Path(out))
    return proto


def _program(source, model: str | None, seed: int | None):
    from graphc.runtime.program import Program
    if isinstance(source, Program):
        return source
    path = Path(source)
    from graphc.runtime.runs import RunFolder
    if path.is_dir():
        given = [flag for flag, value in (("--model", model), ("--seed", seed)) if value is not None]
        if given:
            what = "a run" if RunFolder.is_run(path) else "an artifact"
            verb = "apply" if len(given) > 1 else "applies"
            raise error(f"{path}: {' and '.join(given)} only {verb} to a .nn file (which model, "
                        f"the seed of its parameters); {what} holds one model and its parameters",
                        hint=f"leave out {' and '.join(given)}, or export the .nn file")
    if RunFolder.is_run(path):
        from graphc.runtime import load_run
        return load_run(path, backend="numpy")
    if path.is_dir():
        from graphc.runtime import load_artifact
        return load_artifact(path)
    if path.suffix == ".nn" or path.is_file():
        from graphc.api import compile_file
        return compile_file(path, model=model, seed=seed)
    raise error(f"{path}: no such .nn file, run folder or artifact folder")


def check_opset(opset: int) -> None:
    onnx = require_onnx()
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise error(f"ONNX opset {opset} is not supported: graphc exports opsets {MIN_OPSET} to "
                    f"{newest} (the newest the installed onnx package knows)",
                    hint=f"the default is {DEFAULT_OPSET}")


def build_model(program, opset: int = DEFAULT_OPSET, graph: str = "forward"):
    """The ONNX model of `program`'s forward graph or train step."""
    onnx = require_onnx()
    from onnx import helper, numpy_helper
    check_opset(opset)
    if graph not in GRAPHS:
        raise error(f"unknown graph '{graph}': choose {' or '.join(GRAPHS)}")
    train = graph == "train-step"
    if train and "train_step" not in program.graphs:
        raise error(f"model '{program.name}' has no train step to export",
                    hint="a train step needs a loss and a `train` block with an optimizer")
    g: Graph = program.graphs["train_step" if train else "forward"]
    exporter = _Sources(program, g, train, helper, numpy_helper)
    lw = Lowering(helper, numpy_helper, g, opset, exporter.source, PATTERNS)
    exporter.lowering = lw
    # Reserve the names of every source and output first, so no intermediate takes one.
    for node in g.nodes():
        if node.op in ("input", "param", "state"):
            lw.used.add(node.attr["name"])
    for name, _ in g.outputs:
        lw.used.add(name)
    seen: set[int] = set()
    for name, node in g.outputs:
        if node.op not in ("input", "param", "state", "const", "uniform") and id(node) not in seen:
            lw.preferred[id(node)] = name
            seen.add(id(node))
    outputs = []
    for name, node in g.outputs:
        value = lw.value(node)
        if value != name:
            lw.emit("Identity", [value], node, out=name)
        outputs.append(_value_info(helper, name, node.type))
    inputs = exporter.graph_inputs()
    doc = (f"graphc {__version__}: model {program.name}, "
           + ("the whole training step (forward, backward, optimizer update)" if train else
              "the inference graph" + (" with its input preprocessing" if program.preprocessing
                                       else "")))
    onnx_graph = helper.make_graph(lw.nodes, program.name, inputs, outputs,
                                   initializer=exporter.initializers + lw.initializers,
                                   doc_string=doc)
    proto = helper.make_model(onnx_graph, producer_name="graphc", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", opset)], doc_string=doc)
    proto.ir_version = _ir_version(helper, opset)
    meta = {"graphc.model": program.name, "graphc.graph": graph, "graphc.seed": str(program.seed)}
    if program.preprocessing is not None:
        meta["graphc.preprocess"] = json.dumps(program.preprocessing.to_json())
    if program.meta.get("task"):
        meta["graphc.task"] = json.dumps(program.meta["task"])
    if train:
        meta["graphc.train_step"] = json.dumps(program.train_step_contract.to_json())
        meta["graphc.uniform"] = json.dumps(exporter.uniforms)
    if lw.fused:
        meta["graphc.fused"] = json.dumps(dict(sorted(lw.fused.items())))
    helper.set_model_props(proto, meta)
    if proto.ByteSize() > MAX_PROTO_BYTES:
        raise error(f"model '{program.name}' is over 2 GiB, which one ONNX file holds only with "
                    f"external data; graphc does not write that")
    onnx.checker.check_model(proto)
    return proto


def _ir_version(helper, opset: int) -> int:
    """The oldest IR version that has `opset` (runtimes refuse IR versions newer than theirs)."""
    try:
        return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    except Exception:                       # an onnx without the table: its own default
        return helper.make_model(helper.make_graph([], "g", [], [])).ir_version


def _value_info(helper, name: str, ttype):
    dims = [d if isinstance(d, int) else str(d) for d in ttype.shape]
    return helper.make_tensor_value_info(name, ONNX_DTYPES[ttype.dtype], dims)


class _Sources:
    """The graph inputs and initializers of an export: what each source node of the graph
    becomes."""

    def __init__(self, program, graph: Graph, train: bool, helper, numpy_helper):
        self.program, self.graph, self.train = program, graph, train
        self.helper, self.numpy_helper = helper, numpy_helper
        self.lowering: Lowering | None = None
        self.initializers: list = []
        self.inputs: dict[str, tuple[int, object]] = {}     # name -> (order, value info)
        self.uniforms: list[dict] = []
        self._uniform_names: dict[tuple, str] = {}

    def source(self, node: Node) -> str:
        op = node.op
        if op == "uniform":
            return self._uniform(node)
        name = node.attr["name"]
        if name in self.inputs or any(t.name == name for t in self.initializers):
            return name
        if op == "input":
            if name == RNG_INPUT and self.lowering.opset < 18:
                raise refuse(node, "the random key #rng is read by something other than dropout's "
                                   "uniform draws")
            order = {LR_INPUT: 3, RNG_INPUT: 4}.get(name, 0)
            self.inputs[name] = (order, _value_info(self.helper, name, node.type))
            return name
        if op == "param":
            value = self.program.params[name]
            self.initializers.append(self._tensor(value, name, node))
            if self.train and self.program.param_info[name].role != "constant":
                self.inputs[name] = (1, _value_info(self.helper, name, node.type))
            return name
        if op == "state":
            if not self.train:
                raise refuse(node, f"the forward graph reads optimizer state {name}")
            self.initializers.append(self._tensor(self.program.state[name], name, node))
            self.inputs[name] = (2, _value_info(self.helper, name, node.type))
            return name
        raise AssertionError(f"internal error: {op} is no source")

    def _tensor(self, value, name: str, node: Node):
        array = np.asarray(value)
        return self.numpy_helper.from_array(array.astype(node.type.dtype.numpy, copy=False), name)

    def _uniform(self, node: Node) -> str:
        if not self.train:
            raise refuse(node, "the graph draws random numbers outside a train step")
        stream = int(node.attr["stream"])
        key = (stream, node.type)
        if key not in self._uniform_names:
            name = f"{UNIFORM_PREFIX}{stream}"
            if name in self.inputs:
                name = f"{name}:{len(self.uniforms)}"
            self._uniform_names[key] = name
            self.inputs[name] = (4, _value_info(self.helper, name, node.type))
            self.uniforms.append({"input": name, "stream": stream,
                                  "shape": list(node.attr["shape"]), "dtype": node.type.dtype.value})
        return self._uniform_names[key]

    def graph_inputs(self) -> list:
        """The batch first, then parameters, optimizer state, the learning rate and dropout's
        draws, each group in the order the graph reads them."""
        position = {name: k for k, name in enumerate(self.inputs)}
        ordered = sorted(self.inputs.items(), key=lambda item: (
            item[1][0], item[0] if item[1][0] == 4 else "", position[item[0]]))
        return [info for _, (_, info) in ordered]


def random_feeds(model, seed: int, step: int, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """The random inputs of an exported train step for step `step` (the value of `#step` before
    it) of a run seeded `seed` (the metadata's `graphc.seed`), so that the step drops what
    graphc's own step drops: the key `#rng` where the model computes dropout's draws itself
    (opset 18 or newer), the draws `#uniform:STREAM` where it takes them as inputs (opset 17);
    nothing without dropout. `dims` binds the symbolic sizes: {"N": batch}."""
    from graphc.ir.ops import OPS
    draw = OPS["uniform"].numpy
    props = {p.key: p.value for p in model.metadata_props}
    key = rng_key(seed, step)
    feeds = {}
    if any(i.name == RNG_INPUT for i in model.graph.input):
        feeds[RNG_INPUT] = np.array(key, np.int64)
    for u in json.loads(props.get("graphc.uniform", "[]")):
        shape = bind_shape(tuple(u["shape"]), dims)
        feeds[u["input"]] = draw(np.int64(key), shape, stream=u["stream"], dtype=u["dtype"])
    return feeds


def save(proto, path: Path) -> None:
    from graphc.files import atomic_write
    if path.is_dir():
        raise error(f"{path}: is a folder; -o names the .onnx file to write")
    if not path.parent.is_dir():
        raise error(f"{path.parent}: no such folder")
    atomic_write(path, proto.SerializeToString())


def summary(proto) -> str:
    """One line about an exported model: its nodes by op, its inputs and outputs."""
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    inits = {t.name for t in proto.graph.initializer}
    fed = [i.name for i in proto.graph.input if i.name not in inits]
    defaults = sum(i.name in inits for i in proto.graph.input)
    top = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    inputs = ", ".join(fed) + (f" and {defaults} parameters and state values (default: their "
                               f"values now)" if defaults else "")
    outputs = [o.name for o in proto.graph.output]
    shown = ", ".join(outputs) if len(outputs) <= 6 else \
        ", ".join(outputs[:4]) + f", ... ({len(outputs)} in all)"
    return f"{len(proto.graph.node)} nodes ({top}); inputs {inputs}; outputs {shown}"


__all__ = ["export_onnx", "build_model", "random_feeds"]
