"""`graphc import`'s handlers of elementwise ops, matrix products and layout: one per ONNX op
type, each writing .nn statements through the `Importer` (importer.py, passed in as `imp`) and
declaring the attributes it reads (import_nn.py has the layers)."""
from __future__ import annotations

import numpy as np

from graphc.onnx.import_fold import opset, product, reshape_target, settle
from graphc.onnx.import_types import (
    ATTRS,
    DTYPES,
    HANDLERS,
    NUMPY,
    ImportError_,
    Value,
    attr_number,
    attributes,
    broadcast,
    fmt_list,
    handler,
    is_const,
    is_sym,
    number,
)

# --- elementwise ---------------------------------------------------------------------------------

UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log",
         "Sqrt": "sqrt", "Erf": "erf", "Abs": "abs", "Neg": "neg"}


@handler(*UNARY)
def _unary(imp, node, values):
    x = imp.tensor(node.input[0])
    imp.emit(node.output[0], f"{UNARY[node.op_type]}({x.name})", x.dtype, x.shape)


BINARY = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/", "Pow": "**"}
COMPARE = {"Equal": "equal", "Greater": "greater", "Less": "less", "GreaterOrEqual": "greater_equal",
           "LessOrEqual": "less_equal"}


@handler(*BINARY, *COMPARE)
def _binary(imp, node, values):
    if node.op_type == "Add" and any(i in imp.pending for i in node.input):
        _finish_linear(imp, node)
        return
    like = next((imp.env[i] for i in node.input if isinstance(imp.env[i], Value)), None)
    (a, da, sa), (b, db, sb) = (imp.operand(i, like) for i in node.input)
    if da != db:
        raise ImportError_(f"operands of types {da} and {db}; graphc does not promote")
    if node.op_type == "Div" and not da.startswith("f"):
        raise ImportError_("integer division; graphc's / is for floating point")
    shape = broadcast(sa, sb)
    if node.op_type in COMPARE:
        imp.emit(node.output[0], f"{COMPARE[node.op_type]}({a}, {b})", "bool", shape)
    else:
        imp.emit(node.output[0], f"{a} {BINARY[node.op_type]} {b}", da, shape)


@handler("Max", "Min", "Sum")
def _variadic(imp, node, values):
    like = next((imp.env[i] for i in node.input if isinstance(imp.env[i], Value)), None)
    terms = [imp.operand(i, like) for i in node.input if i]
    if len({t[1] for t in terms}) > 1:
        raise ImportError_("operands of different types; graphc does not promote")
    fn = {"Max": "maximum", "Min": "minimum"}.get(node.op_type)
    expr = terms[0][0]
    for t in terms[1:]:
        expr = f"{fn}({expr}, {t[0]})" if fn else f"{expr} + {t[0]}"
    imp.emit(node.output[0], expr, terms[0][1], broadcast(*(t[2] for t in terms)))


@handler("Reciprocal")
def _reciprocal(imp, node, values):
    x = imp.tensor(node.input[0])
    imp.emit(node.output[0], f"1 / {x.name}", x.dtype, x.shape)


@handler("CastLike", attrs=("saturate", "round_mode"))
def _cast_like(imp, node, values):
    target = imp.env[node.input[1]]
    if is_const(values[0]) and isinstance(target, Value):     # a constant in the data's type
        imp.env[node.output[0]] = values[0].astype(NUMPY[target.dtype])
        return
    x = imp.tensor(node.input[0])
    to = target.dtype if isinstance(target, Value) else \
        {np.dtype(v): k for k, v in NUMPY.items()}.get(np.asarray(target).dtype)
    if to is None:
        raise ImportError_(f"a cast to {np.asarray(target).dtype}, which graphc lacks")
    _cast_to(imp, node, x, to)


@handler("Size")
def _size(imp, node, values):
    x = imp.tensor(node.input[0])
    n = product(x.shape)
    imp.env[node.output[0]] = settle(np.asarray(n, dtype=object))


@handler("Where")
def _where(imp, node, values):
    like = next((imp.env[i] for i in node.input[1:] if isinstance(imp.env[i], Value)), None)
    c = imp.tensor(node.input[0])
    (a, da, sa), (b, db, sb) = (imp.operand(i, like) for i in node.input[1:])
    imp.emit(node.output[0], f"where({c.name}, {a}, {b})", da, broadcast(c.shape, sa, sb))


@handler("Softmax", "LogSoftmax", attrs=("axis",))
def _softmax(imp, node, values):
    x = imp.tensor(node.input[0])
    axis = attributes(node).get("axis", -1 if opset(imp) >= 13 else 1)
    if opset(imp) < 13 and axis % x.ndim != x.ndim - 1:
        raise ImportError_(f"opset {opset(imp)}'s {node.op_type} flattens to 2-D around axis "
                           f"{axis}; graphc reads opset 13's form or the last axis only")
    fn = "softmax" if node.op_type == "Softmax" else "log_softmax"
    imp.emit(node.output[0], f"{fn}({x.name}, axis={axis % x.ndim})", x.dtype, x.shape)


@handler("Gelu", attrs=("approximate",))
def _gelu(imp, node, values):
    x = imp.tensor(node.input[0])
    approx = attributes(node).get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    extra = "" if approx == "none" else f", approximate=\"{approx}\""
    imp.emit(node.output[0], f"gelu({x.name}{extra})", x.dtype, x.shape)


@handler("Dropout", attrs=("seed", "ratio"))
def _dropout(imp, node, values):
    x = imp.tensor(node.input[0])
    if len(node.output) > 1 and node.output[1]:
        raise ImportError_("its mask output; graphc's dropout returns the values only")
    training = values[2] if len(values) > 2 else None
    if training is not None and (not is_const(training) or bool(training)):
        raise ImportError_("training_mode that is not a constant false")
    ratio = values[1] if len(values) > 1 and values[1] is not None else \
        np.asarray(attributes(node).get("ratio", 0.5))
    if not is_const(ratio):
        raise ImportError_("a ratio that is not a constant")
    p = float(ratio)
    if p == 0:
        imp.env[node.output[0]] = x
    else:
        imp.emit(node.output[0], f"dropout({x.name}, {attr_number(p)})", x.dtype, x.shape)


@handler("Identity")
def _identity(imp, node, values):
    imp.env[node.output[0]] = imp.tensor(node.input[0])


def _cast_to(imp, node, x, to) -> None:
    """node's output: x as dtype `to` (x itself where it has that dtype already)."""
    if to == x.dtype:
        imp.env[node.output[0]] = x
    else:
        imp.emit(node.output[0], f"cast({x.name}, {to})", to, x.shape)


@handler("Cast", attrs=("to", "saturate", "round_mode"))
def _cast(imp, node, values):
    x = imp.tensor(node.input[0])
    to = DTYPES.get(attributes(node)["to"])
    if to is None:
        raise ImportError_(f"a cast to ONNX type {attributes(node)['to']}, which graphc lacks")
    _cast_to(imp, node, x, to)


# --- matrix products -------------------------------------------------------------------------------

def matmul_shape(a: tuple, b: tuple) -> tuple:
    if len(a) == 1 and len(b) == 1:
        return ()
    if len(a) == 1:
        return tuple(b[:-2]) + (b[-1],)
    if len(b) == 1:
        return tuple(a[:-1])
    return broadcast(a[:-2], b[:-2]) + (a[-2], b[-1])


@handler("MatMul")
def _matmul(imp, node, values):
    w = values[1]
    users = imp.consumers.get(node.output[0], [])
    if is_const(w) and w.ndim == 2 and len(users) == 1 and users[0] is not None \
            and users[0].op_type == "Add" and isinstance(values[0], Value):
        add = users[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        bias = imp.env.get(other)
        if is_const(bias) and bias.shape == (w.shape[1],):
            imp.pending[node.output[0]] = (node, values[0], w)
            return
    a, b = imp.tensor(node.input[0]), imp.tensor(node.input[1])
    imp.emit(node.output[0], f"{a.name} @ {b.name}", a.dtype, matmul_shape(a.shape, b.shape))


def _finish_linear(imp, add) -> None:
    """`MatMul(x, W) + b` with constant W and b: the linear op."""
    mm_out = add.input[0] if add.input[0] in imp.pending else add.input[1]
    bias_name = add.input[1] if mm_out == add.input[0] else add.input[0]
    mm, x, w = imp.pending.pop(mm_out)
    w_name = mm.input[1]
    if w_name.startswith("onnx::") and bias_name.endswith("bias"):
        imp.origin.setdefault(w_name, bias_name[:-4] + "weight")
    W = imp.param(w_name, w)
    b = imp.param(bias_name, imp.env[bias_name])
    imp.emit(add.output[0], f"linear({x.name}, {W.name}, {b.name})", x.dtype,
             tuple(x.shape[:-1]) + (w.shape[1],))


@handler("Gemm", attrs=("alpha", "beta", "transA", "transB"))
def _gemm(imp, node, values):
    a = attributes(node)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    ta, tb = a.get("transA", 0), a.get("transB", 0)
    x = imp.tensor(node.input[0])
    has_c = len(node.input) > 2 and node.input[2] != ""
    c = values[2] if has_c else None
    w = values[1]
    if is_const(w) and alpha == 1.0 and beta == 1.0 and not ta and (c is None or is_const(c) and
                                                                    c.shape == (w.shape[0 if tb else 1],)):
        W = imp.param(node.input[1], np.ascontiguousarray(w.T) if tb else w, "T" if tb else "")
        args = [x.name, W.name] + ([imp.param(node.input[2], c).name] if c is not None else [])
        imp.emit(node.output[0], f"linear({', '.join(args)})", x.dtype, (x.shape[0], W.shape[1]))
        return
    b = imp.tensor(node.input[1])
    at = f"transpose({x.name})" if ta else x.name
    bt = f"transpose({b.name})" if tb else b.name
    m = x.shape[1] if ta else x.shape[0]
    n = b.shape[0] if tb else b.shape[1]
    expr = f"{at} @ {bt}"
    if alpha != 1.0:
        expr = f"{number(alpha, x.dtype)} * ({expr})"
    if has_c:
        term, _, _ = imp.operand(node.input[2], x)
        expr = f"{expr} + {term}" if beta == 1.0 else f"{expr} + {number(beta, x.dtype)} * {term}"
    imp.emit(node.output[0], expr, x.dtype, (m, n))


# --- layout ------------------------------------------------------------------------------------------

@handler("Flatten", attrs=("axis",))
def _flatten(imp, node, values):
    x = imp.tensor(node.input[0])
    axis = attributes(node).get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    shape = (product(x.shape[:axis]), product(x.shape[axis:]))
    if axis == 1 and x.ndim > 2:
        imp.emit(node.output[0], f"flatten({x.name})", x.dtype, shape)
    elif tuple(shape) == x.shape:
        imp.env[node.output[0]] = x
    else:
        imp.emit(node.output[0], f"reshape({x.name}, {fmt_list(shape)})", x.dtype, shape)


def _reshape_to(imp, out: str, x: Value, shape: tuple) -> None:
    if tuple(shape) == tuple(x.shape):
        imp.env[out] = x
    else:
        imp.emit(out, f"reshape({x.name}, {fmt_list(shape)})", x.dtype, shape)


@handler("Reshape", attrs=("allowzero",))
def _reshape(imp, node, values):
    x = imp.tensor(node.input[0])
    target = values[1]
    if not (is_const(target) or is_sym(target)):
        raise ImportError_("a target shape computed from data")
    _reshape_to(imp, node.output[0], x, reshape_target(x.shape, list(target.reshape(-1)),
                                                       bool(attributes(node).get("allowzero", 0))))


@handler("Squeeze", "Unsqueeze", attrs=("axes",))
def _squeeze(imp, node, values):
    x = imp.tensor(node.input[0])
    axes = attributes(node).get("axes") if len(values) < 2 or values[1] is None else \
        [int(k) for k in values[1].reshape(-1)]
    if node.op_type == "Squeeze":
        axes = [k % x.ndim for k in axes] if axes is not None else \
            [i for i, d in enumerate(x.shape) if d == 1]
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    else:
        n = x.ndim + len(axes)
        shape = list(x.shape)
        for k in sorted(k % n for k in axes):
            shape.insert(k, 1)
    _reshape_to(imp, node.output[0], x, tuple(shape))


@handler("Transpose", attrs=("perm",))
def _transpose(imp, node, values):
    x = imp.tensor(node.input[0])
    perm = list(attributes(node).get("perm", range(x.ndim - 1, -1, -1)))
    if perm == list(range(x.ndim)):
        imp.env[node.output[0]] = x
        return
    imp.emit(node.output[0], f"transpose({x.name}, {fmt_list(perm)})", x.dtype,
             tuple(x.shape[p] for p in perm))


@handler("Concat", attrs=("axis",))
def _concat(imp, node, values):
    xs = [imp.tensor(i) for i in node.input if i]
    axis = attributes(node)["axis"] % xs[0].ndim
    sizes = [x.shape[axis] for x in xs]
    if any(isinstance(s, str) for s in sizes):
        raise ImportError_("a join along the batch axis; graphc's concat needs a known axis")
    shape = xs[0].shape[:axis] + (sum(sizes),) + xs[0].shape[axis + 1:]
    imp.emit(node.output[0], f"concat({', '.join(x.name for x in xs)}, axis={axis})", xs[0].dtype,
             shape)


def _slice(imp, out: str, x: Value, ranges: dict[int, tuple[int, int]]) -> Value:
    expr, shape = x.name, list(x.shape)
    for axis, (start, stop) in sorted(ranges.items()):
        if (start, stop) == (0, shape[axis]):
            continue
        expr = f"slice({expr}, {axis}, {start}, {stop})"
        shape[axis] = stop - start
    if expr == x.name:
        imp.env[out] = x
        return x
    return imp.emit(out, expr, x.dtype, shape)


def _clamp(i: int, n: int) -> int:
    i = int(i)
    return max(0, min(n, i + n if i < 0 else i))


@handler("Slice")
def _slice_op(imp, node, values):
    x = imp.tensor(node.input[0])
    if not all(v is None or is_const(v) for v in values[1:]):
        raise ImportError_("starts, ends, axes or steps that are not constants")
    starts, ends = values[1], values[2]
    axes = values[3] if len(values) > 3 and values[3] is not None else range(len(starts))
    steps = values[4] if len(values) > 4 and values[4] is not None else [1] * len(starts)
    ranges = {}
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = int(ax) % x.ndim
        n = x.shape[ax]
        if int(st) != 1 or isinstance(n, str):
            raise ImportError_("a step other than 1, or a slice of the batch axis")
        ranges[ax] = (_clamp(s, n), max(_clamp(s, n), _clamp(e, n)))
    _slice(imp, node.output[0], x, ranges)


@handler("Split", attrs=("axis", "num_outputs", "split"))
def _split(imp, node, values):
    a = attributes(node)
    x = imp.tensor(node.input[0])
    axis = a.get("axis", 0) % x.ndim
    n = x.shape[axis]
    if isinstance(n, str):
        raise ImportError_("a split of the batch axis")
    sizes = values[1] if len(values) > 1 and values[1] is not None else a.get("split")
    if sizes is None:
        k = len(node.output)
        sizes = [-(-n // k)] * (k - 1) + [n - -(-n // k) * (k - 1)]
    start = 0
    for out, size in zip(node.output, [int(s) for s in np.asarray(sizes).reshape(-1)]):
        _slice(imp, out, x, {axis: (start, start + size)})
        start += size


@handler("Gather", attrs=("axis",))
def _gather(imp, node, values):
    x = imp.tensor(node.input[0])
    idx = values[1]
    axis = attributes(node).get("axis", 0) % x.ndim
    n = x.shape[axis]
    if isinstance(idx, Value) and axis == 0 and x.ndim == 2 and x.dtype.startswith("f") \
            and idx.dtype.startswith(("i", "u")) and not isinstance(n, str):
        # Rows of a [vocab, dim] table picked by computed indices: graphc's embedding (which
        # refuses an index outside [0, vocab), where ONNX takes a negative one from the end).
        imp.emit(node.output[0], f"embedding({idx.name}, {x.name})", x.dtype, idx.shape + (x.shape[1],))
        return
    if not is_const(idx) or idx.ndim > 1 or isinstance(n, str):
        raise ImportError_("a gather of data by computed or many-axis indices (graphc reads a "
                           "constant index, or a run of them, along a known axis)")
    flat = [int(i) % n for i in idx.reshape(-1)]
    if flat != list(range(flat[0], flat[0] + len(flat))):
        raise ImportError_("indices that are not a contiguous run")
    if idx.ndim == 1:
        _slice(imp, node.output[0], x, {axis: (flat[0], flat[-1] + 1)})
        return
    part = _slice(imp, node.output[0] + "_slice", x, {axis: (flat[0], flat[0] + 1)})
    _reshape_to(imp, node.output[0], part, part.shape[:axis] + part.shape[axis + 1:])


@handler("Expand")
def _expand(imp, node, values):
    x = imp.tensor(node.input[0])
    target = values[1]
    if not (is_const(target) or is_sym(target)):
        raise ImportError_("a target shape computed from data")
    shape = broadcast(x.shape, tuple(d if isinstance(d, str) else int(d) for d in target))
    if shape == x.shape:
        imp.env[node.output[0]] = x
    else:
        imp.emit(node.output[0], f"broadcast_to({x.name}, {fmt_list(shape)})", x.dtype, shape)


@handler("ReduceMean", "ReduceSum", "ReduceMax", attrs=("axes", "keepdims", "noop_with_empty_axes"))
def _reduce(imp, node, values):
    a = attributes(node)
    x = imp.tensor(node.input[0])
    axes = a.get("axes") if len(values) < 2 or values[1] is None else list(values[1].reshape(-1))
    keep = a.get("keepdims", 1)
    if axes is None or len(axes) == 0:
        if a.get("noop_with_empty_axes", 0):
            imp.env[node.output[0]] = x
            return
        axes = list(range(x.ndim))
    axes = sorted(int(k) % x.ndim for k in axes)
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes)
    fn = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max"}[node.op_type]
    imp.emit(node.output[0], f"{fn}({x.name}, axis={fmt_list(axes)}{', keepdims=true' if keep else ''})",
             x.dtype, shape)


@handler("Shape", attrs=("start", "end"))
def _shape(imp, node, values):
    x = imp.tensor(node.input[0])
    a = attributes(node)
    dims = np.array(list(x.shape), dtype=object)[a.get("start", 0):a.get("end", x.ndim)]
    imp.env[node.output[0]] = settle(dims)


for _op in ("Constant", "ConstantOfShape", "Range", "Mod"):
    if _op not in HANDLERS:
        def _only_constants(imp, node, values, _op=_op):
            raise ImportError_("inputs that are data; graphc folds it over constants only")
        HANDLERS[_op] = _only_constants
        ATTRS[_op] = {"value", "value_float", "value_floats", "value_int", "value_ints", "fmod"}
