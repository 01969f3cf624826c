"""The top layer that joins the compiler and the runtime: source text or a file becomes a
runnable `Program` (`graphc.compile_file`, `graphc.compile_source`)."""
from __future__ import annotations

from graphc.compiler import CheckedFile, check_source, compile_model, read_source
from graphc.ir.contract import CompiledModel
from graphc.passes import PipelineOptions
from graphc.runtime.program import Program
from graphc.targets import backend_for


def program_of(model: CompiledModel, backend: str | None = "numpy") -> Program:
    """The runtime's Program of a compiled model on `backend` (None: the one its train block's
    `device` asks for)."""
    return Program(model.name, model.graphs, model.params, model.values,
                   backend=backend_for(model.meta.get("train"), backend), meta=model.meta,
                   state=model.state, train_step=model.train_step)


def build_program(checked: CheckedFile, model: str | None = None, backend: str | None = "numpy",
                  seed: int | None = None, options: PipelineOptions | None = None,
                  ranks: int = 1) -> Program:
    """The program of `model` on `backend` (None: the one its train block's `device` asks for);
    `ranks` > 1: the train step of one of that many data-parallel processes."""
    return program_of(compile_model(checked, model, seed, options, ranks), backend)


def compile_source(text: str, backend: str | None = "numpy", model: str | None = None,
                   seed: int | None = None, path: str = "<string>") -> Program:
    """Compile .nn source text. `model` picks one when the text holds several; backend None
    takes the one its train block's `device` asks for."""
    return build_program(check_source(text, path), model, backend, seed)


def compile_file(path, backend: str | None = "numpy", model: str | None = None,
                 seed: int | None = None) -> Program:
    """Compile a .nn file. `model` picks one when the file holds several; backend None takes
    the one its train block's `device` asks for."""
    return compile_source(read_source(path), backend, model, seed, str(path))


def compile_onnx(path, backend: str | None = "numpy", loss: str = "none", seed: int | None = None
                 ) -> Program:
    """Import an ONNX file (as `graphc import` does) and compile it; `loss` adds a label input
    and that loss (cross_entropy, nll, mse) on the first output, so the program trains."""
    import tempfile

    from graphc.onnx.import_cli import import_file, write_imported
    imported = import_file(path, loss)
    with tempfile.TemporaryDirectory(prefix="graphc-onnx-") as tmp:
        return compile_file(write_imported(imported, tmp), backend=backend, seed=seed)
