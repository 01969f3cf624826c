"""ONNX interop: `export` writes what graphc built as an ONNX model, `importer` reads an ONNX
model back as a readable `.nn` file, `backend` runs the ONNX node conformance suite on graphc.

The `onnx` package (and onnxruntime, its checker in the tests) is an optional extra:
`pip install -e '.[onnx]'`. Nothing here is imported by the compiler, the backends or the runtime.
"""
from __future__ import annotations

from types import ModuleType

from graphc.errors import error

INSTALL_HINT = "ONNX support needs the onnx package: pip install -e '.[onnx]'"


def require_onnx() -> ModuleType:
    """The `onnx` module, or a GraphcError with the install hint where it is missing."""
    try:
        import onnx
    except ImportError as exc:
        raise error(INSTALL_HINT) from exc
    return onnx
