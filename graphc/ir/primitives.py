"""Primitive ops: the small set every backend implements. Composites decompose into these.
Over 500 lines on purpose: this is the table of primitives, one declaration per op with its rules
and numpy reference, which every backend's lowering table is checked against; one list to read."""
from __future__ import annotations

import math

import numpy as np

from graphc.ir import collective
from graphc.ir.ops import Attr, OpDef, Operand, TypeError_, register
from graphc.ir.shapes import (
    broadcast,
    float_dtype,
    matmul_shape,
    normalize_axes,
    normalize_axis,
    reduced_shape,
    reshape_shape,
    same_dtype,
)
from graphc.ir.types import DType


def _no_dtype(ops, attrs):
    raise AssertionError("internal error: source ops get their type at construction")


for _name, _doc in [("input", "a value fed at run time"),
                    ("param", "a trained parameter, initialized by the build"),
                    ("state", "optimizer state (moments, accumulators, the step count)"),
                    ("const", "a scalar constant")]:
    register(OpDef(_name, 0, _no_dtype, _no_dtype, None, kind="source", doc=_doc,
                   # Roles and initializers are metadata of the program, not of the computation.
                   attrs={"input": {"name": Attr("str", required=True)},
                          "param": {"name": Attr("str", required=True)},
                          "state": {"name": Attr("str", required=True)},
                          "const": {"value": Attr("any", required=True)}}[_name]))


# --- elementwise -----------------------------------------------------------------------------------

def _unary(name, fn, doc, floats=True, grad_note=""):
    def dtype_rule(ops, attrs):
        return float_dtype(name, ops) if floats else ops[0].type.dtype
    register(OpDef(name, 1, dtype_rule, lambda ops, attrs: ops[0].type.shape,
                   lambda x, out=None: fn(x, out=out), numpy_out=True, doc=doc,
                   ufunc=fn if isinstance(fn, np.ufunc) else None))


def _sigmoid(x, out=None):
    # exp(-log(1 + exp(-x))) is exact in both tails and never overflows.
    out = np.logaddexp(0, -x, out=out)
    np.negative(out, out=out)
    return np.exp(out, out=out)


def erf(x, out=None):
    # numpy has no erf: the C library's, element by element (correctly rounded to x's dtype).
    x = np.asarray(x)
    value = np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype, copy=False)
    if out is None:
        return value
    np.copyto(out, value)
    return out


def _copy(x, out=None):
    if out is None:
        return np.array(x, copy=True)
    np.copyto(out, x)
    return out


_unary("neg", np.negative, "-x", floats=False)
_unary("exp", np.exp, "e to the x")
_unary("log", np.log, "natural logarithm")
_unary("log1p", np.log1p, "log(1 + x), exact for small x")
_unary("sqrt", np.sqrt, "square root")
_unary("abs", np.abs, "absolute value", floats=False)
_unary("tanh", np.tanh, "hyperbolic tangent")
_unary("erf", erf, "the error function (gelu's normal CDF)")
_unary("sigmoid", _sigmoid, "1 / (1 + exp(-x)), stable in both tails")
_unary("relu", lambda x, out=None: np.maximum(x, 0, out=out), "max(x, 0)", floats=False)
_unary("stop_gradient", _copy, "identity whose gradient is zero", floats=False)


def _binary(name, fn, doc, floats=False, compare=False):
    def dtype_rule(ops, attrs):
        dtype = float_dtype(name, ops) if floats else same_dtype(name, ops)
        return DType.bool if compare else dtype
    register(OpDef(name, 2, dtype_rule, lambda ops, attrs: broadcast(name, ops),
                   lambda a, b, out=None: fn(a, b, out=out), numpy_out=True, doc=doc, ufunc=fn))


_binary("add", np.add, "a + b")
_binary("sub", np.subtract, "a - b")
_binary("mul", np.multiply, "a * b")
_binary("div", np.divide, "a / b", floats=True)
_binary("pow", np.power, "a ** b", floats=True)
_binary("maximum", np.maximum, "elementwise max(a, b)")
_binary("minimum", np.minimum, "elementwise min(a, b)")
for _name, _fn, _sym in [("greater", np.greater, ">"), ("greater_equal", np.greater_equal, ">="),
                         ("less", np.less, "<"), ("less_equal", np.less_equal, "<="),
                         ("equal", np.equal, "=="), ("not_equal", np.not_equal, "!=")]:
    _binary(_name, _fn, f"a {_sym} b (bool)", compare=True)


def _where_dtype(ops, attrs):
    if ops[0].type.dtype is not DType.bool:
        raise TypeError_(f"where: the condition must be bool: {ops[0]}",
                         hint=f"compare it, e.g. {ops[0].label} > 0")
    return same_dtype("where", ops[1:])


def _where(c, a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f" and b.ndim == 0 and b.dtype == a.dtype:
        bits = np.dtype(f"u{a.dtype.itemsize}")
        if b.view(bits) == 0:
            # `g where x > 0 else 0` (gradients of relu, dropout): a branch-free select, since
            # np.where mispredicts on a random mask and takes twice as long. Bits are kept
            # exactly (NaN, -0.0), and the 0 is +0.0, as np.where gives.
            mask = np.subtract(0, np.asarray(c).view(np.uint8), dtype=bits)
            return np.bitwise_and(a.view(bits), mask).view(a.dtype)
    return np.where(c, a, b)


register(OpDef("where", 3, _where_dtype, lambda ops, attrs: broadcast("where", ops),
               _where, doc="a where cond else b"))


def _cast_numpy(x, dtype, out=None):
    if out is None:
        return x.astype(DType(dtype).numpy)
    np.copyto(out, x, casting="unsafe")
    return out


register(OpDef("cast", 1, lambda ops, attrs: DType(attrs["dtype"]),
               lambda ops, attrs: ops[0].type.shape, _cast_numpy, numpy_out=True,
               attrs={"dtype": Attr("dtype", required=True)}, doc="convert to another dtype"))


def _one_hot_dtype(ops, attrs):
    if not ops[0].type.dtype.is_int:
        raise TypeError_(f"one_hot: class labels must be integers: {ops[0]}")
    return DType(attrs["dtype"])


def _one_hot(y, depth, dtype, out=None):
    y = np.asarray(y)
    if y.size and (np.minimum.reduce(y, axis=None) < 0 or np.maximum.reduce(y, axis=None) >= depth):
        bad = y[(y < 0) | (y >= depth)].flat[0]
        raise ValueError(f"class label {int(bad)} is out of range [0, {depth})")
    if out is None:
        out = np.empty(y.shape + (depth,), DType(dtype).numpy)
    return np.equal(y[..., None], np.arange(depth), out=out)     # True/False written as 1/0


register(OpDef("one_hot", 1, _one_hot_dtype, lambda ops, attrs: ops[0].type.shape + (attrs["depth"],),
               _one_hot, attrs={"depth": Attr("int", required=True), "dtype": Attr("dtype", "f32")},
               numpy_out=True, doc="one-hot rows of integer labels"))


# --- causal masking (attention) -------------------------------------------------------------------

def _causal_mask_shape(ops, attrs):
    x = ops[0]
    if x.type.ndim < 2:
        raise TypeError_(f"causal_mask: needs scores [..., T, S] with at least two axes: {x}")
    return x.type.shape


def _causal_mask(x, value=float("-inf"), out=None):
    t, s = x.shape[-2:]
    keep = np.arange(s)[None, :] <= np.arange(t)[:, None]      # column <= row: the past and now
    fill = np.asarray(value, dtype=x.dtype)
    if out is None:
        return np.where(keep, x, fill)
    np.copyto(out, np.where(keep, x, fill))
    return out


# Position j of row i is kept when j <= i, else set to `value` (-inf: softmax gives it weight 0).
# An op, not a folded [T, T] constant: backends compare the two loop indices inside the fused
# kernel, so no mask is stored or read.
register(OpDef("causal_mask", 1, lambda ops, attrs: ops[0].type.dtype, _causal_mask_shape, _causal_mask,
               attrs={"value": Attr("float", float("-inf"))}, numpy_out=True,
               doc="x[..., i, j] where j <= i, else value (a causal attention mask)"))


# --- reductions ------------------------------------------------------------------------------------

def _reduction(name, fn, doc):
    def shape_rule(ops, attrs):
        axes = normalize_axes(name, ops[0], attrs["axis"])
        return reduced_shape(ops[0].type.shape, axes, attrs["keepdims"])

    def dtype_rule(ops, attrs):
        return float_dtype(name, ops) if name == "mean" else ops[0].type.dtype

    def run(x, axis, keepdims, out=None):
        if ufunc is not None and axis is not None and x.size >= _SMALL_REDUCE_MIN:
            axes = axis if isinstance(axis, tuple) else (axis,)
            if math.prod(x.shape[a] for a in axes) <= _SMALL_REDUCE_MAX:
                return _small_reduce(ufunc, x, axes, keepdims, out)
        return fn(x, axis=axis, keepdims=keepdims, out=out)

    ufunc = {"sum": np.add, "max": np.maximum}.get(name)

    register(OpDef(name, 1, dtype_rule, shape_rule, run, kind="reduction", numpy_out=True,
                   attrs={"axis": Attr("axes", None), "keepdims": Attr("bool", False)}, doc=doc,
                   ufunc=ufunc))


# Windows (pooling, the ties of its gradient) reduce a few elements of strided axes per output:
# numpy's reduce walks such views element by element, while one ufunc call per element of the
# window runs over all outputs at once.
_SMALL_REDUCE_MAX, _SMALL_REDUCE_MIN = 16, 4096


def _small_reduce(ufunc, x, axes, keepdims, out):
    ndim = x.ndim
    axes = tuple(sorted(a % ndim for a in axes))
    kept = tuple(1 if a in axes else n for a, n in enumerate(x.shape)) if keepdims else \
        tuple(n for a, n in enumerate(x.shape) if a not in axes)
    if out is None:
        out = np.empty(kept, x.dtype)
    target = out.reshape(tuple(n for a, n in enumerate(x.shape) if a not in axes)) if keepdims else out
    for k, index in enumerate(np.ndindex(*(x.shape[a] for a in axes))):
        full = [slice(None)] * ndim
        for a, i in zip(axes, index):
            full[a] = i
        part = x[tuple(full)]
        if k == 0:
            np.copyto(target, part)
        else:
            ufunc(target, part, out=target)
    return out


# The ufuncs' own reduce, not np.sum/np.max: the same loops without the wrappers' cost (a third of
# the call on the small arrays of a training step).
_reduction("sum", np.add.reduce, "sum over axes (all when axis is omitted)")
_reduction("mean", np.mean, "mean over axes (all when axis is omitted)")
_reduction("max", np.maximum.reduce, "maximum over axes (all when axis is omitted)")


# --- matrix products and layout --------------------------------------------------------------------

register(OpDef("matmul", 2, lambda ops, attrs: same_dtype("matmul", ops),
               lambda ops, attrs: matmul_shape(*ops),
               lambda a, b, out=None: np.matmul(a, b, out=out), kind="matmul", numpy_out=True,
               ufunc=np.matmul,
               doc="matrix product with numpy's rules (1-D operands, batched)"))

register(OpDef("reshape", 1, lambda ops, attrs: ops[0].type.dtype,
               lambda ops, attrs: reshape_shape(ops[0], attrs["shape"]),
               lambda x, shape: np.reshape(x, shape),   # symbolic sizes are bound by the executor
               kind="layout", attrs={"shape": Attr("ints", required=True)},
               doc="same elements, another shape (-1 and symbolic dims allowed)"))


def _transpose_axes(ops, attrs):
    ndim = ops[0].type.ndim
    axes = attrs["axes"]
    if axes is None:
        return tuple(reversed(range(ndim)))
    axes = axes if isinstance(axes, tuple) else (axes,)    # `transpose(x, 1)`: one axis
    norm = tuple(normalize_axis("transpose", ops[0], a, attr="axes") for a in axes)
    if sorted(norm) != list(range(ndim)):
        raise TypeError_(f"transpose: axes {list(axes)} are not a permutation of the "
                         f"{ndim} axes of {ops[0].described()}", attr="axes")
    return norm


register(OpDef("transpose", 1, lambda ops, attrs: ops[0].type.dtype,
               lambda ops, attrs: tuple(ops[0].type.shape[a] for a in _transpose_axes(ops, attrs)),
               lambda x, axes: np.transpose(x, axes), kind="layout",
               attrs={"axes": Attr("axes", None)}, doc="permute axes (reverse them by default)"))


def _concat_shape(ops, attrs):
    first = ops[0]
    if not first.type.ndim:
        raise TypeError_(f"concat: cannot concatenate scalars: {first}",
                         hint="make them vectors first: reshape(..., [1])")
    for o in ops:
        if o.type.ndim != first.type.ndim:
            raise TypeError_(f"concat: operands differ in rank: {first}, {o}")
    axis = normalize_axis("concat", first, attrs["axis"])
    total = 0
    for o in ops:
        for i, (a, b) in enumerate(zip(first.type.shape, o.type.shape)):
            if i != axis and a != b:
                raise TypeError_(f"concat: shapes differ off the concatenation axis {axis}: "
                                 f"{first}, {o} ({a} != {b} on axis {i})")
        d = o.type.shape[axis]
        if isinstance(d, str):
            raise TypeError_(f"concat: cannot concatenate along the symbolic axis {d} of "
                             f"{o.described()}", attr="axis")
        total += d
    shape = list(first.type.shape)
    shape[axis] = total
    return tuple(shape)


register(OpDef("concat", (1, None), lambda ops, attrs: same_dtype("concat", ops), _concat_shape,
               lambda *xs, axis: np.concatenate(xs, axis=axis), kind="layout",
               attrs={"axis": Attr("axis", 0)}, doc="join along an axis"))


# --- windows: what convolution and pooling decompose into -------------------------------------------
# A sliding window is a strided view (no copy on any backend); its adjoint adds each window back
# where it was read; padding is a copy into a filled buffer. conv2d is window + matmul, pooling
# window + a reduction, and the backward graphs need nothing else.

def _spatial(name: str, x: Operand, k: int) -> tuple:
    """The last k axes of x, which must have known sizes."""
    if x.type.ndim < k:
        raise TypeError_(f"{name}: needs at least {k} axes: {x}")
    dims = x.type.shape[x.type.ndim - k:]
    if any(isinstance(d, str) for d in dims):
        raise TypeError_(f"{name}: the last {k} axes of {x.described()} must have known sizes")
    return dims


def window_out(size: int, kernel: int, stride: int, dilation: int) -> int:
    """How many windows fit along an axis (PyTorch's floor rule)."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def _window_attrs(name: str, attrs: dict) -> tuple[tuple, tuple, tuple]:
    kernel, stride, dilation = (tuple(attrs[a]) for a in ("kernel", "stride", "dilation"))
    if not kernel or len(stride) != len(kernel) or len(dilation) != len(kernel):
        raise TypeError_(f"{name}: kernel, stride and dilation must have one entry per window axis")
    for a, values in (("kernel", kernel), ("stride", stride), ("dilation", dilation)):
        if any(isinstance(v, str) or v < 1 for v in values):
            raise TypeError_(f"{name}: {a} must be positive integers, got {list(values)}", attr=a)
    return kernel, stride, dilation


def _window_shape(ops, attrs):
    kernel, stride, dilation = _window_attrs("window", attrs)
    x = ops[0]
    dims = _spatial("window", x, len(kernel))
    out = tuple(window_out(*t) for t in zip(dims, kernel, stride, dilation))
    if any(o < 1 for o in out):
        raise TypeError_(f"window: a window of {list(kernel)} (dilation {list(dilation)}) does not "
                         f"fit in the last axes of {x.described()}", attr="kernel")
    return x.type.shape[: x.type.ndim - len(kernel)] + out + kernel


def sliding_windows(x, kernel, stride, dilation):
    k = len(kernel)
    lead, lead_strides = x.shape[: x.ndim - k], x.strides[: x.ndim - k]
    sizes, steps = x.shape[x.ndim - k:], x.strides[x.ndim - k:]
    out = tuple(window_out(*t) for t in zip(sizes, kernel, stride, dilation))
    strides = (lead_strides + tuple(st * s for st, s in zip(steps, stride))
               + tuple(st * d for st, d in zip(steps, dilation)))
    return np.lib.stride_tricks.as_strided(x, lead + out + tuple(kernel), strides, writeable=False)


register(OpDef("window", 1, lambda ops, attrs: ops[0].type.dtype, _window_shape, sliding_windows,
               kind="layout",
               attrs={"kernel": Attr("ints", required=True), "stride": Attr("ints", required=True),
                      "dilation": Attr("ints", required=True)},
               doc="sliding windows over the last axes: [..., H, W] -> [..., OH, OW, KH, KW], a view"))


def _window_add_shape(ops, attrs):
    kernel, stride, dilation = _window_attrs("window_add", attrs)
    g, size, k = ops[0], tuple(attrs["size"]), len(kernel)
    if len(size) != k or g.type.ndim < 2 * k:
        raise TypeError_(f"window_add: {g} does not hold windows of {k} axes", attr="size")
    out = tuple(window_out(*t) for t in zip(size, kernel, stride, dilation))
    if g.type.shape[g.type.ndim - 2 * k:] != out + kernel:
        raise TypeError_(f"window_add: {g} does not end in the {list(out + kernel)} windows of "
                         f"{list(kernel)} over {list(size)} (stride {list(stride)}, dilation "
                         f"{list(dilation)})")
    return g.type.shape[: g.type.ndim - 2 * k] + size


def _window_add(g, size, kernel, stride, dilation, out=None):
    k = len(kernel)
    lead = g.shape[: g.ndim - 2 * k]
    if out is None:
        out = np.empty(lead + tuple(size), g.dtype)
    out[...] = 0
    counts = g.shape[g.ndim - 2 * k: g.ndim - k]
    for offsets in np.ndindex(*kernel):
        target = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                       for o, d, n, s in zip(offsets, dilation, counts, stride))
        out[(Ellipsis,) + target] += g[(Ellipsis,) + offsets]
    return out


register(OpDef("window_add", 1, lambda ops, attrs: ops[0].type.dtype, _window_add_shape, _window_add,
               kind="layout", numpy_out=True,
               attrs={"size": Attr("ints", required=True), "kernel": Attr("ints", required=True),
                      "stride": Attr("ints", required=True), "dilation": Attr("ints", required=True)},
               doc="the adjoint of window: each window added back where it was read (col2im)"))


def _pad_shape(ops, attrs):
    x = ops[0]
    low, high = tuple(attrs["low"]), tuple(attrs["high"])
    if len(low) != x.type.ndim or len(high) != x.type.ndim:
        raise TypeError_(f"pad: low and high need one entry per axis of {x.described()}", attr="low")
    shape = []
    for d, lo, hi in zip(x.type.shape, low, high):
        if isinstance(lo, str) or isinstance(hi, str) or lo < 0 or hi < 0:
            raise TypeError_(f"pad: padding must be non-negative integers, got {list(low)}, "
                             f"{list(high)}", attr="low")
        if isinstance(d, str) and (lo or hi):
            raise TypeError_(f"pad: cannot pad the symbolic axis {d} of {x.described()}", attr="low")
        shape.append(d if isinstance(d, str) else d + lo + hi)
    return tuple(shape)


def _pad(x, low, high, value, out=None):
    if out is None:
        out = np.empty(tuple(n + lo + hi for n, lo, hi in zip(x.shape, low, high)), x.dtype)
    out[...] = value
    out[tuple(slice(lo, lo + n) for n, lo in zip(x.shape, low))] = x
    return out


register(OpDef("pad", 1, lambda ops, attrs: ops[0].type.dtype, _pad_shape, _pad,
               kind="layout", numpy_out=True,
               attrs={"low": Attr("ints", required=True), "high": Attr("ints", required=True),
                      "value": Attr("float", 0.0)},
               doc="x inside a border of `value`: low and high elements before and after each axis"))


# --- helpers the backward graphs need ----------------------------------------------------------------

def _broadcast_to_shape(ops, attrs):
    target = tuple(attrs["shape"])
    x = ops[0].type.shape
    if len(x) > len(target) or any(d != 1 and d != t for d, t in zip(reversed(x), reversed(target))):
        raise TypeError_(f"broadcast_to: cannot broadcast {ops[0].described()} to "
                         f"[{', '.join(map(str, target))}]", attr="shape")
    return target


register(OpDef("broadcast_to", 1, lambda ops, attrs: ops[0].type.dtype, _broadcast_to_shape,
               lambda x, shape, out=None: _copy(np.broadcast_to(x, shape), out=out),
               kind="layout", numpy_out=True, attrs={"shape": Attr("ints", required=True)},
               doc="repeat along axes of size 1 (and new leading axes) to reach a shape"))


def _slice_shape(ops, attrs):
    x = ops[0]
    axis = normalize_axis("slice", x, attrs["axis"])
    size = x.type.shape[axis]
    start, stop = attrs["start"], attrs["stop"]
    if isinstance(size, str) or not 0 <= start < stop <= size:
        raise TypeError_(f"slice: [{start}:{stop}] does not fit axis {axis} of {x.described()}",
                         attr="start")
    shape = list(x.type.shape)
    shape[axis] = stop - start
    return tuple(shape)


def _slice(x, axis, start, stop):
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


register(OpDef("slice", 1, lambda ops, attrs: ops[0].type.dtype, _slice_shape, _slice,
               kind="layout", attrs={"axis": Attr("axis", required=True),
                                     "start": Attr("int", required=True),
                                     "stop": Attr("int", required=True)},
               doc="elements start..stop-1 along an axis"))


def _size_dtype(ops, attrs):
    return DType(attrs["dtype"])


def _size(x, axis, dtype, out=None):
    axes = range(x.ndim) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    value = np.asarray(np.prod([x.shape[a] for a in axes], dtype=np.int64), DType(dtype).numpy)
    if out is None:
        return value
    out[...] = value
    return out


register(OpDef("size", 1, _size_dtype,
               lambda ops, attrs: (normalize_axes("size", ops[0], attrs["axis"]), ())[1],
               _size, kind="layout", numpy_out=True,
               attrs={"axis": Attr("axes", None), "dtype": Attr("dtype", "f32")},
               doc="the number of elements over axes (all by default), as a scalar"))


# --- random numbers --------------------------------------------------------------------------------
# Counter-based: element i of a draw is a hash of (key, stream, i), so a mask is a pure function of
# the run's seed, the step and the op, identical on every backend, with no generator state to carry.
# The hash is "lowbias32" (Wellons), two rounds; backends reimplement these few integer ops.

_M32 = 0xFFFFFFFF


def hash32(x: int) -> int:
    """lowbias32 on one 32-bit word (Python ints, for the per-draw seed words)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _hash32_array(x: np.ndarray) -> np.ndarray:
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def draw_words(key: int, stream: int) -> tuple[int, int]:
    """The two 32-bit words that seed draw `stream` under `key`."""
    key &= (1 << 64) - 1
    first = hash32((key & _M32) ^ hash32(stream + 0x9E3779B9))
    # The high word goes through its own hash first: were it mixed in plainly, a zero high word
    # (seed 0) would make w1 == hash32(w0) and cancel element 0 of every draw to exactly 0.
    return first, hash32(hash32((key >> 32) + 0x632BE5AB) ^ first)


def _uniform(key, shape, stream, dtype, out=None):
    w0, w1 = draw_words(int(key), stream)
    n = int(np.prod(shape, dtype=np.int64))
    bits = _hash32_array(np.arange(n, dtype=np.uint32) ^ np.uint32(w0))
    bits ^= np.uint32(w1)
    bits = _hash32_array(bits)
    # The top 24 bits: exactly representable in f32, so every backend gets the same value in [0, 1).
    value = ((bits >> np.uint32(8)).astype(np.float64) * 2.0 ** -24).reshape(shape)
    if out is None:
        return value.astype(DType(dtype).numpy)
    np.copyto(out, value, casting="unsafe")
    return out


def _uniform_dtype(ops, attrs):
    if not (ops[0].type.dtype.is_int and ops[0].type.shape == ()):
        raise TypeError_(f"uniform: the key must be an integer scalar, got {ops[0]}")
    dtype = DType(attrs["dtype"])
    if not dtype.is_float:
        raise TypeError_(f"uniform draws floats, not {dtype}")
    return dtype


register(OpDef("uniform", 1, _uniform_dtype, lambda ops, attrs: tuple(attrs["shape"]), _uniform,
               kind="random", numpy_out=True,
               attrs={"shape": Attr("ints", required=True), "stream": Attr("int", 0),
                      "dtype": Attr("dtype", "f32")},
               doc="uniform [0, 1) numbers hashed from (key, stream, element index)"))


# --- collectives -----------------------------------------------------------------------------------
# Data-parallel training: the train step built for N ranks reduces its flattened gradients across
# the ranks (graphc.optim.reduce_across_ranks). The group is the process's (graphc.ir.collective):
# one process reduces nothing. Never folded nor precomputed: every run reduces.

def _all_reduce_dtype(ops, attrs):
    if attrs["op"] not in collective.OPS:
        raise TypeError_(f"all_reduce: op must be one of {', '.join(collective.OPS)}, not "
                         f"{attrs['op']!r}", attr="op")
    return float_dtype("all_reduce", ops)


register(OpDef("all_reduce", 1, _all_reduce_dtype, lambda ops, attrs: ops[0].type.shape,
               collective.all_reduce, kind="collective", numpy_out=True,
               attrs={"op": Attr("str", "mean")},
               doc="x reduced elementwise (mean or sum) over the ranks of a data-parallel run"))
