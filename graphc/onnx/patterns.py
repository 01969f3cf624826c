"""Patterns of graphc primitives that have an ONNX op of their own: what `linear`, `conv2d`,
`max_pool2d`, `avg_pool2d`, `batch_norm` (inference), `layer_norm`, `softmax`, `log_softmax`,
`gelu` and `embedding` decompose into, recognized in a lowered graph (artifacts and runs hold only
lowered graphs) and exported as Gemm, Conv, MaxPool, AveragePool, BatchNormalization,
LayerNormalization, Softmax, LogSoftmax, Gelu and Gather. Each pattern is keyed by the op of the
node it ends at and returns the ONNX value, or None where the node does not match (the primitive
is then lowered as it is)."""
from __future__ import annotations

import math
from collections.abc import Callable

from graphc.ir.node import Node

PATTERNS: dict[str, list[Callable]] = {}


def pattern(op: str, onnx_op: str):
    def register(fn):
        fn.onnx_op = onnx_op
        PATTERNS.setdefault(op, []).append(fn)
        return fn
    return register


def _const(node: Node, value: float | None = None, rel: float = 1e-6) -> bool:
    if node.op != "const":
        return False
    if value is None:
        return True
    v = float(node.attr["value"])
    return math.isclose(v, value, rel_tol=rel, abs_tol=0.0)


def _pairs(node: Node):
    """Both orders of a commutative op's operands."""
    a, b = node.inputs
    return ((a, b), (b, a))


def _axes(node: Node) -> tuple[int, ...] | None:
    axis = node.attr.get("axis")
    if axis is None:
        return None
    ndim = node.inputs[0].type.ndim
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in axes))


def _shift(x_minus_max: Node) -> tuple[Node, int] | None:
    """x and the axis of `x - [stop_gradient](max(x, axis, keepdims))`, softmax's shift."""
    if x_minus_max.op != "sub":
        return None
    x, m = x_minus_max.inputs
    if m.op == "stop_gradient":
        m = m.inputs[0]
    if m.op != "max" or m.inputs[0] != x or not m.attr["keepdims"]:
        return None
    axes = _axes(m)
    if axes is None or len(axes) != 1:
        return None
    return x, axes[0]


def _unread(lw, absorbed: list[Node], shared: Node, readers: int) -> bool:
    """Whether nothing outside the pattern reads what it absorbs (`absorbed` once each, `shared`
    `readers` times): else, as in a train step whose backward graph reads the intermediates, the
    decomposition is emitted anyway and fusing would do the work twice."""
    return all(lw.single_use(n) for n in absorbed) and lw.uses.get(id(shared), 0) <= readers


@pattern("div", "Softmax")
def softmax(lw, node: Node):
    e, total = node.inputs
    if e.op != "exp" or total.op != "sum" or total.inputs[0] != e or not total.attr["keepdims"]:
        return None
    found = _shift(e.inputs[0])
    if found is None or _axes(total) != (found[1],) or not _unread(lw, [total, e.inputs[0]], e, 2):
        return None
    x, axis = found
    return lw.emit("Softmax", [lw.value(x)], node, lw.out_name(node), axis=axis)


@pattern("sub", "LogSoftmax")
def log_softmax(lw, node: Node):
    s, lse = node.inputs
    if lse.op != "log" or lse.inputs[0].op != "sum":
        return None
    total = lse.inputs[0]
    if total.inputs[0].op != "exp" or total.inputs[0].inputs[0] != s or not total.attr["keepdims"]:
        return None
    found = _shift(s)
    if found is None or _axes(total) != (found[1],) or not _unread(lw, [lse, total, total.inputs[0]], s, 2):
        return None
    x, axis = found
    return lw.emit("LogSoftmax", [lw.value(x)], node, lw.out_name(node), axis=axis)


@pattern("add", "Gemm")
def gemm(lw, node: Node):
    """x @ W + b with a 2-D x and W and a bias over the columns: `linear`."""
    for prod, bias in _pairs(node):
        if prod.op != "matmul" or not lw.single_use(prod):
            continue
        a, w = prod.inputs
        if a.type.ndim != 2 or w.type.ndim != 2 or not node.dtype.is_float:
            continue
        if bias.type.shape not in ((w.type.shape[1],), (1, w.type.shape[1])) or bias.op == "const":
            continue
        return lw.emit("Gemm", [lw.value(a), lw.value(w), lw.value(bias)], node, lw.out_name(node))
    return None


def _transposed(lw, node: Node) -> tuple[Node, int]:
    """(a, 1) for a 2-D transpose(a) that nothing else reads, else (node, 0)."""
    if node.op == "transpose" and node.type.ndim == 2 and lw.single_use(node) \
            and tuple(node.attr["axes"] or (1, 0)) in ((1, 0), (-1, -2)):
        return node.inputs[0], 1
    return node, 0


@pattern("matmul", "Gather")
def embedding(lw, node: Node):
    """one_hot(indices) @ table, `embedding`'s decomposition: the rows the indices pick."""
    rows, table = node.inputs
    if rows.op != "one_hot" or table.type.ndim != 2 or not lw.single_use(rows) \
            or rows.attr["depth"] != table.type.shape[0]:
        return None
    return lw.emit("Gather", [lw.value(table), lw.value(rows.inputs[0])], node, lw.out_name(node), axis=0)


@pattern("matmul", "Gemm")
def gemm_transposed(lw, node: Node):
    """A 2-D product of a transposed operand (the backward graph's x^T @ g, g @ W^T): Gemm's
    transA, transB instead of a Transpose."""
    a, b = node.inputs
    if a.type.ndim != 2 or b.type.ndim != 2 or not node.dtype.is_float:
        return None
    (a, ta), (b, tb) = _transposed(lw, a), _transposed(lw, b)
    if not (ta or tb):
        return None
    return lw.emit("Gemm", [lw.value(a), lw.value(b)], node, lw.out_name(node), transA=ta, transB=tb)


def _windows(node: Node) -> tuple[Node, tuple, tuple, tuple, list, float] | None:
    """The image, kernel, stride, dilation and pads (ONNX order) of a `window` over the last two
    axes of [N, C, H, W] images, its padding (a `pad` of H and W only) folded in."""
    if node.op != "window" or node.inputs[0].type.ndim != 4 or len(node.attr["kernel"]) != 2:
        return None
    x = node.inputs[0]
    pads, fill = [0, 0, 0, 0], None
    if x.op == "pad":
        low, high = tuple(x.attr["low"]), tuple(x.attr["high"])
        if low[:2] != (0, 0) or high[:2] != (0, 0):
            return None
        pads, fill, x = [low[2], low[3], high[2], high[3]], float(x.attr["value"]), x.inputs[0]
    return (x, tuple(node.attr["kernel"]), tuple(node.attr["stride"]),
            tuple(node.attr["dilation"]), pads, fill)


@pattern("max", "MaxPool")
def max_pool(lw, node: Node):
    found = _windows(node.inputs[0])
    if found is None or _axes(node) != (4, 5) or node.attr["keepdims"]:
        return None
    x, kernel, stride, dilation, pads, fill = found
    if fill is not None and fill != float("-inf"):
        return None
    return lw.emit("MaxPool", [lw.value(x)], node, lw.out_name(node), kernel_shape=list(kernel),
                   strides=list(stride), dilations=list(dilation), pads=pads)


def _divided(node: Node) -> tuple[Node, float] | None:
    """(a, n) of a / n or a * (1 / n) for a constant n (simplify turns a division by a power
    of two into a product)."""
    if node.op == "div" and _const(node.inputs[1]) and float(node.inputs[1].attr["value"]):
        return node.inputs[0], float(node.inputs[1].attr["value"])
    if node.op == "mul":
        for a, c in _pairs(node):
            if _const(c) and float(c.attr["value"]):
                return a, 1.0 / float(c.attr["value"])
    return None


def avg_pool(lw, node: Node):
    found = _divided(node)
    if found is None:
        return None
    total, count = found
    if total.op != "sum" or total.attr["keepdims"] or _axes(total) != (4, 5):
        return None
    found = _windows(total.inputs[0])
    if found is None:
        return None
    x, kernel, stride, dilation, pads, fill = found
    if dilation != (1, 1) or not math.isclose(count, kernel[0] * kernel[1], rel_tol=1e-6) \
            or fill not in (None, 0.0):
        return None
    return lw.emit("AveragePool", [lw.value(x)], node, lw.out_name(node), kernel_shape=list(kernel),
                   strides=list(stride), pads=pads, count_include_pad=1)


avg_pool.onnx_op = "AveragePool"
PATTERNS.setdefault("div", []).append(avg_pool)
PATTERNS.setdefault("mul", []).append(avg_pool)


@pattern("transpose", "Conv")
def conv(lw, node: Node, bias: Node | None = None, at: Node | None = None):
    """conv2d's im2col form: transpose(reshape(reshape(W) @ reshape(transpose(window(x)))),
    (1, 0, 2, 3)), groups = 1."""
    if tuple(node.attr["axes"] or ()) != (1, 0, 2, 3):
        return None
    r = node.inputs[0]
    if r.op != "reshape" or r.inputs[0].op != "matmul":
        return None
    wmat, cols = r.inputs[0].inputs
    if wmat.op != "reshape" or cols.op != "reshape" or cols.inputs[0].op != "transpose":
        return None
    t = cols.inputs[0]
    if tuple(t.attr["axes"] or ()) != (1, 4, 5, 0, 2, 3):
        return None
    found = _windows(t.inputs[0])
    w = wmat.inputs[0]
    if found is None or w.type.ndim != 4:
        return None
    x, kernel, stride, dilation, pads, fill = found
    if fill not in (None, 0.0) or tuple(w.type.shape[2:]) != kernel:
        return None
    ins = [lw.value(x), lw.value(w)] + ([lw.value(bias)] if bias is not None else [])
    at = at or node
    return lw.emit("Conv", ins, at, lw.out_name(at), kernel_shape=list(kernel), strides=list(stride),
                   dilations=list(dilation), pads=pads, group=1)


@pattern("add", "Conv")
def conv_bias(lw, node: Node):
    for y, b in _pairs(node):
        if y.op == "transpose" and b.op == "reshape" and b.inputs[0].type.ndim == 1 \
                and y.type.ndim == 4 and b.type.shape == (y.type.shape[1], 1, 1) and lw.single_use(y):
            out = conv(lw, y, bias=b.inputs[0], at=node)
            if out is not None:
                return out
    return None


def _channel(v: Node, ndim: int) -> Node | None:
    """The per-channel vector v of batch norm's `reshape(v, [C, 1, 1])` (itself for [N, C])."""
    if ndim == 2:
        return v if v.type.ndim == 1 else None
    if v.op == "reshape" and v.inputs[0].type.ndim == 1 and v.type.shape[1:] == (1, 1):
        return v.inputs[0]
    return None


def _scale_shift(node: Node):
    """(normalized, gamma, beta) of `normalized * gamma + beta`, either operand order."""
    for prod, beta in _pairs(node):
        if prod.op != "mul":
            continue
        for normalized, gamma in _pairs(prod):
            if normalized.op == "div":
                return normalized, gamma, beta
    return None


def _std(node: Node) -> tuple[Node, float] | None:
    """(var, eps) of sqrt(var + eps)."""
    if node.op != "sqrt" or node.inputs[0].op != "add":
        return None
    for var, eps in _pairs(node.inputs[0]):
        if _const(eps):
            return var, float(eps.attr["value"])
    return None


@pattern("add", "BatchNormalization")
def batch_norm(lw, node: Node):
    """Inference batch norm: (x - mean) / sqrt(var + eps) * gamma + beta per channel."""
    found = _scale_shift(node)
    if found is None or node.type.ndim not in (2, 4):
        return None
    normalized, gamma, beta = found
    centered, std = normalized.inputs
    ndim = node.type.ndim
    eps = _std(std)
    if centered.op != "sub" or eps is None:
        return None
    x, mean = centered.inputs
    parts = [_channel(v, ndim) for v in (gamma, beta, mean, eps[0])]
    if any(p is None or p.type.shape != (node.type.shape[1],) for p in parts) \
            or x.type.shape != node.type.shape:
        return None
    return lw.emit("BatchNormalization", [lw.value(x)] + [lw.value(p) for p in parts], node,
                   lw.out_name(node), epsilon=eps[1])


def _last_mean(node: Node) -> Node | None:
    """x of mean(x, last axis, keepdims) or of sum(x, last axis, keepdims) / count."""
    divided = _divided(node)
    if divided is not None and divided[0].op == "sum":
        total, count = divided
        n = total.inputs[0].type.shape[-1]
        if not (isinstance(n, int) and math.isclose(count, n, rel_tol=1e-6)):
            return None
        node = total
    elif node.op != "mean":
        return None
    x = node.inputs[0]
    if not node.attr["keepdims"] or _axes(node) != (x.type.ndim - 1,):
        return None
    return x


def _normalized(normalized: Node, d) -> tuple[Node, float] | None:
    """(x, eps) of (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) over the last axis."""
    centered, std = normalized.inputs
    eps = _std(std)
    if centered.op != "sub" or eps is None:
        return None
    x, mean = centered.inputs
    if _last_mean(mean) != x or d != x.type.shape[-1]:
        return None
    sq = _last_mean(eps[0])
    if sq is None or sq.op != "mul" or sq.inputs[0] != centered or sq.inputs[1] != centered:
        return None
    return x, eps[1]


@pattern("add", "LayerNormalization")
def layer_norm(lw, node: Node):
    if lw.opset < 17 or node.type.ndim < 1:
        return None
    found = _scale_shift(node)
    if found is None:
        return None
    normalized, gamma, beta = found
    d = node.type.shape[-1]
    parts = _normalized(normalized, d)
    if parts is None or gamma.type.shape != (d,) or beta.type.shape != (d,):
        return None
    x, eps = parts
    return lw.emit("LayerNormalization", [lw.value(x), lw.value(gamma), lw.value(beta)], node,
                   lw.out_name(node), axis=-1, epsilon=eps)


@pattern("mul", "LayerNormalization")
def layer_norm_without_bias(lw, node: Node):
    """layernorm(bias=false): normalized * gamma, LayerNormalization without its B."""
    if lw.opset < 17 or node.type.ndim < 1:
        return None
    d = node.type.shape[-1]
    for normalized, gamma in _pairs(node):
        if normalized.op != "div" or gamma.type.shape != (d,):
            continue
        parts = _normalized(normalized, d)
        if parts is not None:
            x, eps = parts
            return lw.emit("LayerNormalization", [lw.value(x), lw.value(gamma)], node,
                           lw.out_name(node), axis=-1, epsilon=eps)
    return None


@pattern("mul", "Gelu")
def gelu(lw, node: Node):
    """0.5 * x * (1 + erf(x / sqrt 2)), or tanh's approximation: Gelu from opset 20 (before
    it, the decomposition with Erf or Tanh)."""
    if lw.opset < 20:
        return None
    for half_x, cdf in _pairs(node):
        if half_x.op != "mul" or cdf.op != "add":
            continue
        x = next((v for v, h in _pairs(half_x) if _const(h, 0.5)), None)
        if x is None:
            continue
        inner = next((v for v, one in _pairs(cdf) if _const(one, 1.0)), None)
        if inner is None:
            continue
        if inner.op == "erf" and inner.inputs[0].op == "mul" and any(
                v == x and _const(c, 1 / math.sqrt(2)) for v, c in _pairs(inner.inputs[0])):
            return lw.emit("Gelu", [lw.value(x)], node, lw.out_name(node))
        if inner.op == "tanh" and _is_tanh_gelu(inner.inputs[0], x):
            return lw.emit("Gelu", [lw.value(x)], node, lw.out_name(node), approximate="tanh")
    return None


def _is_tanh_gelu(inner: Node, x: Node) -> bool:
    """sqrt(2 / pi) * (x + 0.044715 * x * x * x), as gelu's decomposition builds it."""
    if inner.op != "mul":
        return False
    for c, s in _pairs(inner):
        if _const(c, math.sqrt(2 / math.pi)) and s.op == "add" and x in s.inputs:
            cube = s.inputs[1] if s.inputs[0] == x else s.inputs[0]
            return cube.op == "mul" and any(_const(k, 0.044715) for k in cube.inputs)
    return False
