"""graphc: a declarative computation-graph compiler for neural networks.

`compile_file` and `compile_source` are imported lazily, so `graphc.runtime` (which runs built
artifacts) never pulls in the front end or lark.
"""
from graphc.version import __version__

__all__ = ["compile_file", "compile_source", "compile_onnx", "load_artifact", "load_run",
           "export_onnx", "GraphcError", "__version__"]


def __getattr__(name):
    if name in ("compile_file", "compile_source", "compile_onnx"):
        from graphc import api
        return getattr(api, name)
    if name == "export_onnx":
        from graphc.onnx.export import export_onnx
        return export_onnx
    if name in ("load_artifact", "load_run"):
        from graphc import runtime
        return getattr(runtime, name)
    if name == "runtime":
        import importlib
        return importlib.import_module("graphc.runtime")
    if name == "GraphcError":
        from graphc.errors import GraphcError
        return GraphcError
    raise AttributeError(f"module 'graphc' has no attribute {name!r}")
