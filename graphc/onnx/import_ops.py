"""The ONNX ops `graphc import` reads: one handler per op type, writing .nn statements through the
`Importer`, the attributes each accepts, and the folding of constants and of shapes that hold the
symbolic batch size (object arrays of ints and names such as 'N')."""
from __future__ import annotations

import math

import numpy as np

from graphc.onnx.importer import DTYPES, NUMPY, Importer, ImportError_, Value, number

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


def opset(imp: Importer) -> int:
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

def is_const(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype != object


def is_sym(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype == object


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
        raise ImportError_(f"a shape computes {a} {op} {b} of the batch size; graphc reshapes "
                           f"carry a symbolic size only whole")
    return {"Mul": lambda: a * b, "Add": lambda: a + b, "Sub": lambda: a - b,
            "Div": lambda: a // b, "Equal": lambda: a == b, "Mod": lambda: a % b}[op]()


def symbolic(imp: Importer, node, values: list) -> list:
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


def convert(imp: Importer, node) -> None:
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


# --- shapes ---------------------------------------------------------------------------------------

def broadcast(*shapes) -> tuple:
    n = max(len(s) for s in shapes)
    out = []
    for dims in zip(*[(1,) * (n - len(s)) + tuple(s) for s in shapes]):
        rest = {d for d in dims if d != 1}
        if len(rest) > 1:
            raise ImportError_(f"shapes {', '.join(str(list(s)) for s in shapes)} do not broadcast")
        out.append(rest.pop() if rest else 1)
    return tuple(out)


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
                       f"axes; graphc reshapes carry a symbolic size only whole")


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


def attr_number(v: float) -> str:
    """A float attribute (ONNX stores them as f32) written as briefly as it reads back: 1e-05."""
    text = str(np.float32(v))
    return text if "e" in text or "." in text else text + ".0"


def fmt_list(xs) -> str:
    return "[" + ", ".join(str(x) for x in xs) + "]"


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
    if to == x.dtype:
        imp.env[node.output[0]] = x
    else:
        imp.emit(node.output[0], f"cast({x.name}, {to})", to, x.shape)


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


@handler("Cast", attrs=("to", "saturate", "round_mode"))
def _cast(imp, node, values):
    x = imp.tensor(node.input[0])
    to = DTYPES.get(attributes(node)["to"])
    if to is None:
        raise ImportError_(f"a cast to ONNX type {attributes(node)['to']}, which graphc lacks")
    if to == x.dtype:
        imp.env[node.output[0]] = x
    else:
        imp.emit(node.output[0], f"cast({x.name}, {to})", to, x.shape)


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


# --- convolution and pooling -----------------------------------------------------------------------

def _pads(a: dict, size: tuple, kernel: list, strides: list, dilations: list) -> list[int]:
    """[begin of each spatial axis..., end of each...], auto_pad resolved."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(a.get("pads", [0] * 2 * len(size)))
    if auto == "VALID":
        return [0] * 2 * len(size)
    low, high = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        low.append(big if auto == "SAME_LOWER" else small)
        high.append(small if auto == "SAME_LOWER" else big)
    return low + high


def _pad_expr(x: Value, low: list[int], high: list[int], value: str = "") -> tuple[str, tuple]:
    """`pad` of the spatial axes (all but the first two)."""
    low, high = [0, 0] + list(low), [0, 0] + list(high)
    shape = x.shape[:2] + tuple(n + lo + hi for n, lo, hi in zip(x.shape[2:], low[2:], high[2:]))
    v = f", value={value}" if value else ""
    return f"pad({x.name}, {fmt_list(low)}, {fmt_list(high)}{v})", shape


def _opts(**kw) -> str:
    return "".join(f", {k}={fmt_list(v) if isinstance(v, (list, tuple)) else v}"
                   for k, v in kw.items() if v is not None)


@handler("Conv", attrs=("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"))
def _conv(imp, node, values):
    a = attributes(node)
    x = imp.tensor(node.input[0])
    layer = node.name.strip("/").replace("/", "_") or node.output[0]
    for i, role in zip(node.input[1:], ("weight", "bias")):
        if i.startswith("onnx::"):      # a weight the exporter renamed (batch norm folded in)
            imp.origin.setdefault(i, f"{layer}_{role}")
    w = imp.tensor(node.input[1])
    if x.ndim != 4 or w.ndim != 4:
        raise ImportError_(f"a {x.ndim - 2}-D convolution; graphc's conv2d is 2-D")
    kernel = list(w.shape[2:])
    strides = list(a.get("strides", [1, 1]))
    dil = list(a.get("dilations", [1, 1]))
    pads = _pads(a, x.shape[2:], kernel, strides, dil)
    src = x
    if pads[0] != pads[2] or pads[1] != pads[3]:
        expr, shape = _pad_expr(x, pads[:2], pads[2:])
        src = imp.emit(node.output[0] + "_padded", expr, x.dtype, shape)
        pads = [0, 0, 0, 0]
    args = [src.name, w.name]
    if len(node.input) > 2 and node.input[2]:
        args.append(imp.tensor(node.input[2]).name)
    out_hw = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                   for n, p, d, k, s in zip(src.shape[2:], pads[:2], dil, kernel, strides))
    group = a.get("group", 1)
    opts = _opts(stride=strides if strides != [1, 1] else None,
                 padding=pads[:2] if pads[:2] != [0, 0] else None,
                 dilation=dil if dil != [1, 1] else None, groups=group if group != 1 else None)
    imp.emit(node.output[0], f"conv2d({', '.join(args)}{opts})", x.dtype,
             (x.shape[0], w.shape[0]) + out_hw)


@handler("MaxPool", "AveragePool", attrs=("auto_pad", "ceil_mode", "dilations", "kernel_shape",
                                          "pads", "strides", "storage_order", "count_include_pad"))
def _pool(imp, node, values):
    """2-D pools without dilation or odd padding are graphc's max_pool2d and avg_pool2d; the rest
    (1-D, 3-D, dilated, ceil_mode, one-sided padding) are a reduction over `window`s."""
    a = attributes(node)
    x = imp.tensor(node.input[0])
    if len(node.output) > 1 and node.output[1]:
        raise ImportError_("its Indices output")
    sp = x.ndim - 2
    kernel = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * sp))
    dil = list(a.get("dilations", [1] * sp))
    pads = _pads(a, x.shape[2:], kernel, strides, dil)
    low, high = pads[:sp], pads[sp:]
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dil)]
    extra = [0] * sp
    if a.get("ceil_mode", 0):
        for i, (n, e, s) in enumerate(zip(x.shape[2:], span, strides)):
            total = n + low[i] + high[i]
            out = -(-(total - e) // s) + 1
            if (out - 1) * s >= n + low[i]:
                out -= 1
            extra[i] = max(0, (out - 1) * s + e - total)
    padded = [hi + ex for hi, ex in zip(high, extra)]
    out_shape = lambda shape: shape[:2] + tuple(  # noqa: E731
        (n - e) // s + 1 for n, e, s in zip(shape[2:], span, strides))
    plain = sp == 2 and dil == [1, 1] and low == high and extra == [0, 0] and all(
        p <= k // 2 for p, k in zip(low, kernel))
    include = a.get("count_include_pad", 0)
    fn = "max_pool2d" if node.op_type == "MaxPool" else "avg_pool2d"
    if plain and (node.op_type == "MaxPool" or include or low == [0, 0]):
        padding = _opts(padding=low) if low != [0, 0] else ""
        shape = x.shape[:2] + tuple((n + 2 * p - k) // s + 1
                                    for n, p, k, s in zip(x.shape[2:], low, kernel, strides))
        imp.emit(node.output[0], f"{fn}({x.name}, {fmt_list(kernel)}{_opts(stride=strides)}"
                                 f"{padding})", x.dtype, shape)
        return
    axes = fmt_list(range(x.ndim, x.ndim + sp))
    win = f"{fmt_list(kernel)}, {fmt_list(strides)}, {fmt_list(dil)}"
    if node.op_type == "MaxPool":
        src = x
        if any(low) or any(padded):
            expr, shape = _pad_expr(x, low, padded, number(-FLT_MAX[x.dtype], x.dtype))
            src = imp.emit(node.output[0] + "_padded", expr, x.dtype, shape)
        imp.emit(node.output[0], f"max(window({src.name}, {win}), axis={axes})", x.dtype,
                 out_shape(src.shape))
        return
    # The mean over each window's counted cells: the windows' means over all their cells (of
    # the zero-padded images), divided by the share of each window that counts.
    src = x
    if any(low) or any(padded):
        expr, shape = _pad_expr(x, low, padded)
        src = imp.emit(node.output[0] + "_padded", expr, x.dtype, shape)
    mean = f"mean(window({src.name}, {win}), axis={axes})"
    if src is x:
        imp.emit(node.output[0], mean, x.dtype, out_shape(src.shape))
        return
    m = imp.emit(node.output[0] + "_mean", mean, x.dtype, out_shape(src.shape))
    corner = x.name
    for axis in range(2):
        corner = f"slice({corner}, {axis}, 0, 1)"
    ones = imp.emit(node.output[0] + "_ones", f"cast(equal({corner}, {corner}), {x.dtype})",
                    x.dtype, (1, 1) + x.shape[2:])
    expr, shape = _pad_expr(ones, low, high, "1.0" if include else "")
    counted = imp.emit(node.output[0] + "_counted", expr, x.dtype, shape)
    if any(extra):
        expr, shape = _pad_expr(counted, [0] * sp, extra)
        counted = imp.emit(node.output[0] + "_cells", expr, x.dtype, shape)
    share = imp.emit(node.output[0] + "_share", f"mean(window({counted.name}, {win}), axis={axes})",
                     x.dtype, out_shape(counted.shape))
    imp.emit(node.output[0], f"{m.name} / {share.name}", x.dtype, m.shape)


# --- normalization -----------------------------------------------------------------------------------

@handler("BatchNormalization", attrs=("epsilon", "momentum", "training_mode"))
def _batch_norm(imp, node, values):
    a = attributes(node)
    if any(o for o in node.output[1:]):
        raise ImportError_("its running-statistics outputs (training mode)")
    x = imp.tensor(node.input[0])
    g, b, m, v = (imp.tensor(i) for i in node.input[1:5])
    eps = a.get("epsilon", 1e-5)
    if x.ndim in (2, 4) and all(isinstance(t, Value) and t.name in imp.arrays for t in (g, b, m, v)) \
            and len({t.name for t in (g, b, m, v)}) == 4:
        # the layer with its parameters given: fine-tuning updates the running statistics
        # (ONNX's momentum weighs the old estimate, graphc's the batch's)
        momentum = attr_number(1.0 - float(np.float32(a.get("momentum", 0.9))))
        imp.emit(node.output[0], f"batchnorm({x.name}, {g.name}, {b.name}, {m.name}, {v.name}, "
                                 f"eps={attr_number(eps)}, momentum={momentum})", x.dtype, x.shape)
        return
    imp.emit(node.output[0], f"batch_norm({x.name}, {g.name}, {b.name}, {m.name}, {v.name}, "
                             f"eps={attr_number(eps)})", x.dtype, x.shape)


@handler("LayerNormalization", attrs=("axis", "epsilon", "stash_type"))
def _layer_norm(imp, node, values):
    a = attributes(node)
    x = imp.tensor(node.input[0])
    axis = a.get("axis", -1) % x.ndim
    eps = attr_number(a.get("epsilon", 1e-5))
    has_b = len(node.input) > 2 and node.input[2] != ""
    extra = [o for o in node.output[1:] if o]
    g = imp.tensor(node.input[1])
    bv = values[2] if has_b else None
    b_shape = tuple(np.shape(bv)) if is_const(bv) else \
        getattr(imp.env.get(node.input[2]) if has_b else None, "shape", None)
    if axis == x.ndim - 1 and not extra and has_b and g.shape == x.shape[-1:] \
            and b_shape == x.shape[-1:]:
        b = imp.tensor(node.input[2])
        imp.emit(node.output[0], f"layer_norm({x.name}, {g.name}, {b.name}, eps={eps})",
                 x.dtype, x.shape)
        return
    axes = fmt_list(range(axis, x.ndim))
    kept = x.shape[:axis] + (1,) * (x.ndim - axis)
    mu = imp.emit(node.output[0] + "_mean", f"mean({x.name}, axis={axes}, keepdims=true)", x.dtype, kept)
    d = imp.emit(node.output[0] + "_centered", f"{x.name} - {mu.name}", x.dtype, x.shape)
    var = imp.emit(node.output[0] + "_var", f"mean({d.name} * {d.name}, axis={axes}, keepdims=true)",
                   x.dtype, kept)
    inv = imp.emit(node.output[0] + "_inv_std", f"1 / sqrt({var.name} + {eps})", x.dtype, kept)
    expr = f"{d.name} * {inv.name} * {g.name}"
    if has_b:
        expr += f" + {imp.operand(node.input[2], x)[0]}"
    imp.emit(node.output[0], expr, x.dtype, x.shape)
    for out, v in zip(node.output[1:], (mu, inv)):
        if out:
            imp.env[out] = v


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
