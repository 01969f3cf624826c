"""Reading an ONNX file from outside, safely: bounded size, protobuf only (no code runs), external
data only from files inside the model's own folder, each of bounded size."""
from __future__ import annotations

import os
from pathlib import Path

from graphc.errors import error
from graphc.files import read_bytes
from graphc.onnx import INSTALL_HINT

MAX_ONNX_BYTES = 2 * 2**30          # protobuf's own limit on one message
MAX_EXTERNAL_BYTES = 16 * 2**30     # external data of all initializers together


def load_onnx(path) -> object:
    """The ModelProto of `path`, its external data (if any) loaded from inside its folder."""
    try:
        import onnx
    except ImportError:
        raise error(INSTALL_HINT) from None
    path = Path(path)
    data = read_bytes(path, MAX_ONNX_BYTES, "the ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as err:    # protobuf's DecodeError: a damaged or foreign file
        raise error(f"not a readable ONNX model ({type(err).__name__}: {err})", file=path) from None
    if not model.HasField("graph"):
        raise error("not an ONNX model: it holds no graph", file=path)
    _load_external(onnx, model, path)
    return model


def _external_tensors(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t


def _load_external(onnx, model, path: Path) -> None:
    """Refuse external data that leads outside the model's folder or is too large; else load it."""
    external = [t for t in _external_tensors(model)
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    base = path.resolve().parent
    total = 0
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(base):
            raise error(f"initializer '{t.name}' keeps its data in '{location}', outside the "
                        f"model's folder {base}; refused", file=path)
        if not target.is_file():
            raise error(f"initializer '{t.name}': its external data file '{location}' is missing "
                        f"or not a regular file", file=path)
        total += int(info.get("length", target.stat().st_size))
        if total > MAX_EXTERNAL_BYTES:
            raise error(f"the model's external data passes the limit of {MAX_EXTERNAL_BYTES:,} "
                        f"bytes", file=path)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as err:
        raise error(f"cannot read the model's external data: {err}", file=path) from None
