"""What `graphc import`'s walk (importer.py), its folding (import_fold.py) and its op handlers
(import_ops.py, import_nn.py) share: the tensors the .nn model computes, the dtypes, the error a
node raises, the handler table, numbers and lists as .nn literals, broadcasting."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPES = {1: "f32", 11: "f64", 6: "i32", 7: "i64", 9: "bool", 10: "f16"}
NUMPY = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64,
         "bool": np.bool_, "f16": np.float16}
ONNX_TYPE_NAMES = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 8: "string", 12: "uint32",
                   13: "uint64", 14: "complex64", 15: "complex128", 16: "bfloat16"}


class ImportError_(Exception):
    """A node graphc cannot express; becomes a GraphcError naming the node."""


@dataclass
class Value:
    """A tensor the .nn model computes: its name there, dtype and shape (ints and names)."""
    name: str
    dtype: str
    shape: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)


def number(value, dtype: str) -> str:
    """A scalar as a .nn literal (in parentheses when negative)."""
    if dtype == "bool":
        raise ImportError_("a boolean constant cannot be written as a number")
    if dtype.startswith("i"):
        text = str(int(value))
    else:
        v = float(value)
        if not np.isfinite(v):
            raise ImportError_(f"the constant {v} is not finite; .nn numbers are finite")
        text = repr(v)
        if "e" not in text and "." not in text:
            text += ".0"
    return f"({text})" if text.startswith("-") else text


# op -> the attributes graphc reads (others make the op unsupported, named in the message)
ATTRS: dict[str, set[str]] = {}
HANDLERS: dict = {}
FLT_MAX = {"f32": float(np.finfo(np.float32).max), "f64": float(np.finfo(np.float64).max),
           "f16": float(np.finfo(np.float16).max)}


def handler(*ops: str, attrs: tuple[str, ...] = ()):
    def register(fn):
        for op in ops:
            HANDLERS[op] = fn
            ATTRS[op] = set(attrs)
        return fn
    return register


def attributes(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def opset(imp) -> int:
    return max((o.version for o in imp.model.opset_import if o.domain in ("", "ai.onnx")), default=1)


def is_const(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype != object


def is_sym(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype == object


def broadcast(*shapes) -> tuple:
    n = max(len(s) for s in shapes)
    out = []
    for dims in zip(*[(1,) * (n - len(s)) + tuple(s) for s in shapes]):
        rest = {d for d in dims if d != 1}
        if len(rest) > 1:
            raise ImportError_(f"shapes {', '.join(str(list(s)) for s in shapes)} do not broadcast")
        out.append(rest.pop() if rest else 1)
    return tuple(out)


def attr_number(v: float) -> str:
    """A float attribute (ONNX stores them as f32) written as briefly as it reads back: 1e-05."""
    text = str(np.float32(v))
    return text if "e" in text or "." in text else text + ".0"


def fmt_list(xs) -> str:
    return "[" + ", ".join(str(x) for x in xs) + "]"


def opts(**kw) -> str:
    return "".join(f", {k}={fmt_list(v) if isinstance(v, (list, tuple)) else v}"
                   for k, v in kw.items() if v is not None)
