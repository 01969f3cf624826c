"""graphc as an `onnx.backend.base.Backend`, for onnx's node conformance suite: `prepare` imports
the model (`graphc import`'s path: .nn text and .npz in a temporary folder) and compiles it on one
of graphc's backends; the rep's `run` feeds the inputs in the graph's order and returns the outputs
in the graph's order."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnx.backend.base import Backend, BackendRep

from graphc.onnx.import_cli import write_imported
from graphc.onnx.importer import import_model

# Inputs that set a shape or an option rather than carry data: (op, input position). graphc's
# shapes are fixed when it compiles, so a model fed one of these is compiled for the value fed.
SHAPE_OPERANDS = {("Reshape", 1), ("Expand", 1), ("Dropout", 1), ("Dropout", 2)}


def _shape_inputs(model) -> list[str]:
    graph_inputs = {i.name for i in model.graph.input}
    used = {}
    for node in model.graph.node:
        for pos, name in enumerate(node.input):
            if name in graph_inputs:
                used.setdefault(name, set()).add((node.op_type, pos))
    return [name for name, uses in used.items() if uses <= SHAPE_OPERANDS]


def _compile(model, backend: str):
    from graphc.api import compile_file
    imported = import_model(model, "node", "<onnx node test>")
    with tempfile.TemporaryDirectory(prefix="graphc-onnx-test-") as tmp:
        nn = write_imported(imported, Path(tmp))
        return compile_file(nn, backend=backend), imported


class GraphcRep(BackendRep):
    """A prepared model: compiled now, or, where inputs set shapes, per value fed (cached)."""

    def __init__(self, model, backend: str):
        self.model = model
        self.backend = backend
        self.all_inputs = [i.name for i in model.graph.input
                           if i.name not in {t.name for t in model.graph.initializer}]
        self.shape_inputs = _shape_inputs(model)
        self.compiled: dict[bytes, tuple] = {}
        if not self.shape_inputs:
            self.compiled[b""] = _compile(model, backend)

    def _specialized(self, fed: dict):
        from onnx import numpy_helper
        key = b"".join(np.asarray(fed[n]).tobytes() for n in self.shape_inputs)
        if key not in self.compiled:
            model = type(self.model)()
            model.CopyFrom(self.model)
            keep = [i for i in model.graph.input if i.name not in self.shape_inputs]
            del model.graph.input[:]
            model.graph.input.extend(keep)
            model.graph.initializer.extend(numpy_helper.from_array(np.asarray(fed[n]), n)
                                           for n in self.shape_inputs)
            self.compiled[key] = _compile(model, self.backend)
        return self.compiled[key]

    def run(self, inputs, **kwargs):
        if isinstance(inputs, dict):
            fed = {k: np.asarray(v) for k, v in inputs.items()}
        else:
            fed = {name: np.asarray(v) for name, v in zip(self.all_inputs, inputs)}
        program, imported = self._specialized(fed) if self.shape_inputs else self.compiled[b""]
        names = [i.name for i in self.model.graph.input if i.name not in self.shape_inputs
                 and i.name in fed]
        feeds = {nn: fed[onnx] for nn, onnx in zip(imported.inputs, names)
                 if nn in program.inputs}
        out = program.forward(**feeds)
        return [out[name] for name in imported.outputs]


class GraphcBackend(Backend):
    """graphc on its numpy backend; `LLVMBackend` is the same on llvm."""
    graphc_backend = "numpy"

    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs) -> GraphcRep:
        super().prepare(model, device, **kwargs)
        return GraphcRep(model, cls.graphc_backend)

    @classmethod
    def run_model(cls, model, inputs, device: str = "CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


class LLVMBackend(GraphcBackend):
    graphc_backend = "llvm"
