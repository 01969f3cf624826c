"""`graphc import`'s folding: which nodes it can read (`check_supported`, one message per op),
constants evaluated now by onnx's reference evaluator, and shapes that hold the symbolic batch
size (object arrays of ints and names such as 'N') carried through the exporters' Shape ->
Gather -> Unsqueeze -> Concat chains; `convert` sends every other node to its handler."""
from __future__ import annotations

import numpy as np

from graphc.onnx.import_types import (
    ATTRS,
    HANDLERS,
    ImportError_,
    attributes,
    is_const,
    is_sym,
)


def opset(imp) -> int:
    return max((o.version for o in imp.model.opset_import if o.domain in ("", "ai.onnx")), default=1)


def check_supported(model) -> list[str]:
    """One message per op type graphc cannot read, listing what is missing."""
    missing: dict[str, set[str]] = {}
    nodes: dict[str, list[str]] = {}
    for node in model.graph.node:
        what = set()
        if node.domain not in ("", "ai.onnx"):
            what.add(f"the domain '{node.domain}'")
        elif node.op_type not in HANDLERS:
            what.add("the op itself")
        else:
            a = attributes(node)
            what |= {f"the attribute {k}" for k in a if k not in ATTRS[node.op_type]}
            what |= _attribute_values(node.op_type, a)
        if what:
            missing.setdefault(node.op_type, set()).update(what)
            nodes.setdefault(node.op_type, []).append(node.name or node.output[0])
    out = []
    for op, what in missing.items():
        names = nodes[op]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        out.append(f"ONNX op {op} is not supported: graphc lacks {', '.join(sorted(what))} "
                   f"({len(names)} node{'s' if len(names) != 1 else ''}: {shown})")
    return out


def _attribute_values(op: str, a: dict) -> set[str]:
    bad = set()
    if op in ("MaxPool", "AveragePool") and a.get("storage_order", 0) != 0:
        bad.add("storage_order=1")
    if op == "Conv" and "kernel_shape" in a and len(a["kernel_shape"]) != 2:
        bad.add(f"{len(a['kernel_shape'])}-D convolution (2-D only)")
    if op == "BatchNormalization" and a.get("training_mode", 0):
        bad.add("training_mode=1")
    return bad


# --- constants and symbolic shapes ---------------------------------------------------------------

def settle(a: np.ndarray) -> np.ndarray:
    """An object array with no names left is an int64 array again."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(a, dtype=object)
    if a.dtype == object and not any(isinstance(x, str) for x in a.flat):
        return a.astype(np.int64)
    return a


def fold(node, values: list) -> list[np.ndarray]:
    """A node whose inputs are all constants, evaluated now by onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator
    feeds = {name: v for name, v in zip(node.input, values) if name}
    try:
        return ReferenceEvaluator(node).run(None, feeds)
    except Exception as err:
        raise ImportError_(f"cannot fold its constant inputs: {err}") from None


def _sym_arith(op: str, a, b):
    if isinstance(a, str) or isinstance(b, str):
        s, other = (a, b) if isinstance(a, str) else (b, a)
        if isinstance(other, (int, np.integer)) and (
                op == "Mul" and other == 1 or op in ("Add", "Sub") and other == 0
                or op == "Div" and other == 1 and isinstance(a, str)):
            return s
        if op == "Equal":
            return a == b
        sign = {"Mul": "*", "Add": "+", "Sub": "-", "Div": "/", "Mod": "%"}.get(op, op)
        raise ImportError_(f"a shape computes {a} {sign} {b} from the batch size; graphc reshapes "
                           f"carry a symbolic size only whole (export with a fixed batch size)")
    return {"Mul": lambda: a * b, "Add": lambda: a + b, "Sub": lambda: a - b,
            "Div": lambda: a // b, "Equal": lambda: a == b, "Mod": lambda: a % b}[op]()


def symbolic(imp, node, values: list) -> list:
    """Shape arithmetic over sizes that include the batch size (object arrays)."""
    op, a = node.op_type, attributes(node)
    x = values[0]
    if op in ("Identity", "Cast"):
        return [x]
    if op == "Gather":
        return [settle(np.take(x, np.asarray(values[1]).astype(np.int64), axis=a.get("axis", 0)))]
    if op in ("Unsqueeze", "Squeeze"):
        axes = a.get("axes") if len(values) < 2 or values[1] is None else list(values[1])
        if op == "Squeeze":
            return [settle(np.squeeze(x, tuple(axes)) if axes is not None else np.squeeze(x))]
        out = x
        for ax in sorted(int(k) % (x.ndim + len(axes)) for k in axes):
            out = np.expand_dims(out, ax)
        return [out]
    if op == "Concat":
        return [settle(np.concatenate([np.asarray(v, dtype=object).reshape(-1) if v.ndim == 0 else
                                       v.astype(object) for v in values], axis=a.get("axis", 0)))]
    if op == "Slice":
        starts, ends = values[1], values[2]
        axes = values[3] if len(values) > 3 and values[3] is not None else range(len(starts))
        steps = values[4] if len(values) > 4 and values[4] is not None else [1] * len(starts)
        idx = [slice(None)] * x.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            idx[int(ax)] = slice(int(s), int(e), int(st))
        return [settle(x[tuple(idx)])]
    if op == "Reshape":
        return [x.reshape([int(d) for d in values[1]])]
    if op in ("Mul", "Add", "Sub", "Div", "Equal", "Mod"):
        left, right = (np.asarray(v, dtype=object) for v in values)
        out = np.frompyfunc(lambda p, q: _sym_arith(op, p, q), 2, 1)(left, right)
        out = np.asarray(out, dtype=object)
        return [out.astype(bool) if op == "Equal" else settle(out)]
    if op == "Where":
        return [settle(np.where(np.asarray(values[0]).astype(bool), values[1], values[2]).astype(object))]
    raise ImportError_("it computes with a size that depends on the batch size, which graphc "
                       "folds only through Shape, Gather, Slice, Concat, Unsqueeze, Squeeze, Cast, "
                       "Reshape, Equal, Where and arithmetic that keeps the size whole")


def convert(imp, node) -> None:
    """One node: folded when its inputs are known now, else written as .nn statements."""
    values = [imp.env.get(i) if i else None for i in node.input]
    for name in node.input:
        if name and name not in imp.env and name not in imp.pending:
            raise ImportError_(f"its input '{name}' is not computed before it")
    present = [v for v in values if v is not None]
    if any(i in imp.pending for i in node.input):
        HANDLERS[node.op_type](imp, node, values)
        return
    if node.op_type == "Constant":
        out = fold(node, [])
    elif node.op_type == "Identity" and is_const(values[0]):
        imp.env[node.output[0]] = values[0]
        imp.origin[node.output[0]] = node.output[0]    # its own parameter, not a tie
        return
    elif present and all(is_const(v) for v in present) and node.op_type != "Shape":
        out = fold(node, values)
    elif present and all(is_const(v) or is_sym(v) for v in present):
        out = symbolic(imp, node, values)
    else:
        HANDLERS[node.op_type](imp, node, values)
        return
    for name, v in zip(node.output, out):
        imp.env[name] = np.asarray(v)


def _factor(shape) -> tuple[int, list[str]]:
    k, syms = 1, []
    for d in shape:
        if isinstance(d, str):
            syms.append(d)
        else:
            k *= int(d)
    return k, sorted(syms)


def product(shape) -> int | str:
    k, syms = _factor(shape)
    if not syms:
        return k
    if k == 1 and len(syms) == 1:
        return syms[0]
    raise ImportError_(f"the size {'*'.join([str(k)] + syms)} mixes the batch size with other "
                       f"axes; graphc reshapes carry a symbolic size only whole (export with a fixed "
                       f"batch size)")


def reshape_target(shape: tuple, target, allowzero: bool) -> tuple:
    dims = []
    for i, d in enumerate(target):
        if not isinstance(d, str):
            d = int(d)
            if d == 0 and not allowzero:
                d = shape[i]
            elif d == 0:
                raise ImportError_("a reshape to an empty axis (allowzero with 0); graphc sizes are "
                                   "at least 1")
        dims.append(d)
    if -1 in dims:
        k, syms = _factor(shape)
        known = [d for d in dims if d != -1]
        kk, ksyms = _factor(known)
        rest = list(syms)
        for s in ksyms:
            if s not in rest:
                raise ImportError_(f"reshape of {list(shape)} to {list(target)}")
            rest.remove(s)
        if kk == 0 or k % kk:
            raise ImportError_(f"reshape of {list(shape)} to {list(target)}: sizes do not divide")
        dims[dims.index(-1)] = product([k // kk] + rest)
    return tuple(dims)
