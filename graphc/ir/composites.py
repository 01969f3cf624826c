"""Composite ops: declared in the op table like primitives (rules, numpy reference) and decomposed
into primitives by the `decompose` pass. The numpy references here are the oracles the tests hold
the decompositions to; fused kernels recover the speed of the decomposed forms.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from graphc.errors import SourceLoc
from graphc.ir import ops as op_table
from graphc.ir.contract import RNG_INPUT
from graphc.ir.node import Node
from graphc.ir.ops import Attr, OpDef, Operand, TypeError_, register
from graphc.ir.primitives import erf, sliding_windows, window_out
from graphc.ir.shapes import broadcast, float_dtype, matmul_shape, normalize_axis, same_dtype
from graphc.ir.types import DType, TensorType, dim_factors, product_dim


class Emit:
    """Builds the primitive nodes of a decomposition, all carrying the composite's location."""

    def __init__(self, loc: SourceLoc | None, tags: frozenset[str] = frozenset()):
        self.loc, self.tags = loc, tags

    def __call__(self, op: str, *inputs: Node, **attrs) -> Node:
        return op_table.apply(op, inputs, attrs, loc=self.loc, tags=self.tags)

    def const(self, value, dtype: DType) -> Node:
        return op_table.source("const", TensorType(dtype, ()), loc=self.loc, value=value)


def composite(name, arity, dtype_rule, shape_rule, numpy_ref, decompose, attrs=None, doc=""):
    register(OpDef(name, arity, dtype_rule, shape_rule, numpy_ref, attrs=attrs or {},
                   kind="composite", decompose=decompose, doc=doc))


def _same_shape(ops):
    return ops[0].type.shape


def _scalar(ops, attrs):
    return ()


# --- activations and normalizers ------------------------------------------------------------------

def _axis_attr_rule(name):
    def rule(ops, attrs):
        normalize_axis(name, ops[0], attrs["axis"])
        return ops[0].type.shape
    return rule


def _np_log_softmax(x, axis):
    s = x - np.max(x, axis=axis, keepdims=True)
    return s - np.log(np.sum(np.exp(s), axis=axis, keepdims=True))


def _shifted(emit: Emit, x: Node, axis: int) -> Node:
    # The max is a constant shift: it cancels in the result, so no gradient flows through it.
    m = emit("stop_gradient", emit("max", x, axis=axis, keepdims=True))
    return emit("sub", x, m)


def _softmax_decompose(emit, inputs, attrs):
    e = emit("exp", _shifted(emit, inputs[0], attrs["axis"]))
    return emit("div", e, emit("sum", e, axis=attrs["axis"], keepdims=True))


def _log_softmax_decompose(emit, inputs, attrs):
    s = _shifted(emit, inputs[0], attrs["axis"])
    return emit("sub", s, emit("log", emit("sum", emit("exp", s), axis=attrs["axis"], keepdims=True)))


composite("softmax", 1, lambda ops, a: float_dtype("softmax", ops), _axis_attr_rule("softmax"),
          lambda x, axis: np.exp(_np_log_softmax(x, axis)), _softmax_decompose,
          {"axis": Attr("axis", -1)}, "exp(x) / sum(exp(x)) along an axis, shifted by the max")
composite("log_softmax", 1, lambda ops, a: float_dtype("log_softmax", ops),
          _axis_attr_rule("log_softmax"), _np_log_softmax, _log_softmax_decompose,
          {"axis": Attr("axis", -1)}, "x - logsumexp(x) along an axis, no overflow")


def _leaky_decompose(emit, inputs, attrs):
    x = inputs[0]
    slope = emit.const(attrs["slope"], x.dtype)
    return emit("where", emit("greater", x, emit.const(0.0, x.dtype)), x, emit("mul", x, slope))


composite("leaky_relu", 1, lambda ops, a: float_dtype("leaky_relu", ops),
          lambda ops, a: ops[0].type.shape,
          lambda x, slope: np.where(x > 0, x, slope * x), _leaky_decompose,
          {"slope": Attr("float", 0.01)}, "x where x > 0 else slope * x")


def _same_float(name):
    return (lambda ops, a: float_dtype(name, ops)), (lambda ops, a: ops[0].type.shape)


def _elu_decompose(emit, inputs, attrs):
    # exp of min(x, 0): the branch where doesn't take must not overflow (its inf would meet a
    # zero gradient and make NaN).
    x = inputs[0]
    zero = emit.const(0.0, x.dtype)
    neg = emit("sub", emit("exp", emit("minimum", x, zero)), emit.const(1.0, x.dtype))
    return emit("where", emit("greater", x, zero), x, emit("mul", emit.const(attrs["alpha"], x.dtype), neg))


composite("elu", 1, *_same_float("elu"),
          lambda x, alpha: np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1)),
          _elu_decompose, {"alpha": Attr("float", 1.0)}, "x where x > 0 else alpha * (exp(x) - 1)")


def _softplus_decompose(emit, inputs, attrs):
    # log(1 + exp(b x)) / b as max(b x, 0) + log1p(exp(-|b x|)): no overflow for large b x.
    x = inputs[0]
    beta = emit.const(attrs["beta"], x.dtype)
    bx = emit("mul", x, beta)
    stable = emit("add", emit("maximum", bx, emit.const(0.0, x.dtype)),
                  emit("log1p", emit("exp", emit("neg", emit("abs", bx)))))
    return emit("div", stable, beta)


composite("softplus", 1, *_same_float("softplus"),
          lambda x, beta: np.logaddexp(0, beta * x) / beta, _softplus_decompose,
          {"beta": Attr("float", 1.0)}, "log(1 + exp(beta * x)) / beta, a smooth relu")

def _gelu_np(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _gelu_decompose(emit, inputs, attrs):
    x = inputs[0]
    c = lambda v: emit.const(v, x.dtype)                    # noqa: E731
    if attrs["approximate"] == "tanh":
        inner = emit("mul", c(math.sqrt(2 / math.pi)),
                     emit("add", x, emit("mul", c(0.044715), emit("mul", x, emit("mul", x, x)))))
        cdf = emit("add", c(1.0), emit("tanh", inner))
    else:
        cdf = emit("add", c(1.0), emit("erf", emit("mul", x, c(1 / math.sqrt(2)))))
    return emit("mul", emit("mul", c(0.5), x), cdf)


def _gelu_shape(ops, attrs):
    if attrs["approximate"] not in ("none", "tanh"):
        raise TypeError_(f"gelu: approximate must be \"none\" or \"tanh\", got "
                         f"\"{attrs['approximate']}\"", attr="approximate")
    return ops[0].type.shape


composite("gelu", 1, lambda ops, a: float_dtype("gelu", ops), _gelu_shape, _gelu_np, _gelu_decompose,
          {"approximate": Attr("str", "none")},
          "x * P(X <= x) for X ~ N(0, 1), with erf (PyTorch's default) or approximate=\"tanh\"")


composite("swish", 1, *_same_float("swish"), lambda x: x / (1 + np.exp(-x)),
          lambda emit, inputs, attrs: emit("mul", inputs[0], emit("sigmoid", inputs[0])), {},
          "x * sigmoid(x) (SiLU)")


# --- convolution and pooling (PyTorch's argument names and NCHW layout) ---------------------------

def _pair(name: str, attrs: dict, key: str, least: int) -> tuple[int, int]:
    """An int or a pair [h, w] of an option, checked."""
    v = attrs[key]
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or any(not isinstance(i, int) or i < least for i in pair):
        raise TypeError_(f"{name}: {key} must be an integer >= {least} or a pair [h, w] of them, "
                         f"got {v if isinstance(v, int) else list(v)}", attr=key)
    return pair


def _image(name: str, x: Operand) -> tuple:
    if x.type.ndim != 4 or any(isinstance(d, str) for d in x.type.shape[1:]):
        raise TypeError_(f"{name}: needs images [N, C, H, W] with known C, H and W: {x}")
    if not x.type.dtype.is_float:
        raise TypeError_(f"{name}: needs floating-point images: {x}")
    return x.type.shape


def _out_size(name: str, x: Operand, size, kernel, stride, padding, dilation) -> tuple[int, int]:
    out = tuple(window_out(n + 2 * p, k, s, d)
                for n, k, s, p, d in zip(size, kernel, stride, padding, dilation))
    if min(out) < 1:
        raise TypeError_(f"{name}: a {kernel[0]}x{kernel[1]} window (padding {list(padding)}, "
                         f"dilation {list(dilation)}) does not fit in the {size[0]}x{size[1]} "
                         f"images of {x.described()}", attr="kernel")
    return out


def _conv_options(attrs) -> tuple:
    return tuple(_pair("conv2d", attrs, k, least) for k, least in
                 (("stride", 1), ("padding", 0), ("dilation", 1)))


def _conv2d_shape(ops, attrs):
    x, w = ops[0], ops[1]
    n, c, h, wd = _image("conv2d", x)
    stride, padding, dilation = _conv_options(attrs)
    groups = attrs["groups"]
    if w.type.ndim != 4 or any(isinstance(d, str) for d in w.type.shape):
        raise TypeError_(f"conv2d: the weight must be [out_channels, in_channels / groups, kh, kw]: {w}")
    o, cg, kh, kw = w.type.shape
    if groups < 1 or c % groups or o % groups:
        raise TypeError_(f"conv2d: groups={groups} must divide the {c} input channels of {x} "
                         f"and the {o} output channels of {w}", attr="groups")
    if cg != c // groups:
        raise TypeError_(f"conv2d: {w} expects {cg * groups} input channels, {x} has {c}"
                         + (f" (groups={groups})" if groups > 1 else ""))
    if len(ops) == 3 and ops[2].type.shape != (o,):
        raise TypeError_(f"conv2d: the bias must be [{o}], one per output channel: {ops[2]}")
    oh, ow = _out_size("conv2d", x, (h, wd), (kh, kw), stride, padding, dilation)
    return (n, o, oh, ow)


def _conv2d_np(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    stride, padding, dilation = _conv_options(
        {"stride": stride, "padding": padding, "dilation": dilation})
    (ph, pw), (o, cg, kh, kw) = padding, w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    og = o // groups
    out = np.concatenate([
        np.einsum("ncyxij,ocij->noyx",
                  sliding_windows(xp[:, g * cg:(g + 1) * cg], (kh, kw), stride, dilation),
                  w[g * og:(g + 1) * og])
        for g in range(groups)], axis=1)
    return out if b is None else out + b[:, None, None]


def _conv2d_decompose(emit, inputs, attrs):
    # im2col, transposed: the windows of every output pixel as columns [C*kh*kw, N*OH*OW] (the
    # batch and pixel axes flattened together so one BLAS GEMM per group does it; the image's
    # rows stay the innermost, contiguous axis of the copy), then W [O, C*kh*kw] @ columns.
    x, w = inputs[0], inputs[1]
    stride, padding, dilation = _conv_options(attrs)
    groups = attrs["groups"]
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    if padding != (0, 0):
        x = emit("pad", x, low=(0, 0) + padding, high=(0, 0) + padding, value=0.0)
    windows = emit("window", x, kernel=(kh, kw), stride=stride, dilation=dilation)
    oh, ow = windows.shape[2:4]
    rows = product_dim(*_times(n, oh * ow))
    og = o // groups
    outs = []
    for g in range(groups):
        part = windows if groups == 1 else emit("slice", windows, axis=1, start=g * cg, stop=(g + 1) * cg)
        cols = emit("reshape", emit("transpose", part, axes=(1, 4, 5, 0, 2, 3)), shape=(cg * kh * kw, rows))
        wg = w if groups == 1 else emit("slice", w, axis=0, start=g * og, stop=(g + 1) * og)
        outs.append(emit("matmul", emit("reshape", wg, shape=(og, cg * kh * kw)), cols))
    y = outs[0] if groups == 1 else emit("concat", *outs, axis=0)
    y = emit("transpose", emit("reshape", y, shape=(o, n, oh, ow)), axes=(1, 0, 2, 3))
    if len(inputs) == 3:
        y = emit("add", y, emit("reshape", inputs[2], shape=(o, 1, 1)))
    return y


def _times(d, k: int) -> tuple[int, tuple[str, ...]]:
    coef, syms = dim_factors(d)
    return coef * k, syms


composite("conv2d", (2, 3), lambda ops, a: same_dtype("conv2d", ops), _conv2d_shape,
          _conv2d_np, _conv2d_decompose,
          {"stride": Attr("axes", 1), "padding": Attr("axes", 0), "dilation": Attr("axes", 1),
           "groups": Attr("int", 1)},
          "2-D convolution of images [N, C, H, W] with weights [O, C / groups, kh, kw] (+ bias [O])")


def _pool_options(name: str, attrs) -> tuple:
    kernel = _pair(name, attrs, "kernel", 1)
    stride = kernel if attrs["stride"] is None else _pair(name, attrs, "stride", 1)
    padding = _pair(name, attrs, "padding", 0)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise TypeError_(f"{name}: padding {list(padding)} must be at most half the kernel "
                         f"{list(kernel)}", attr="padding")
    return kernel, stride, padding


def _pool_shape(name):
    def rule(ops, attrs):
        x = ops[0]
        n, c, h, w = _image(name, x)
        kernel, stride, padding = _pool_options(name, attrs)
        return (n, c) + _out_size(name, x, (h, w), kernel, stride, padding, (1, 1))
    return rule


def _pool_windows_np(name, x, attrs, fill):
    kernel, stride, (ph, pw) = _pool_options(name, attrs)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    return sliding_windows(xp, kernel, stride, (1, 1))


def _pool_decompose(name, reduce, fill):
    def decompose(emit, inputs, attrs):
        x = inputs[0]
        kernel, stride, padding = _pool_options(name, attrs)
        if padding != (0, 0):
            x = emit("pad", x, low=(0, 0) + padding, high=(0, 0) + padding, value=fill)
        windows = emit("window", x, kernel=kernel, stride=stride, dilation=(1, 1))
        return emit(reduce, windows, axis=(4, 5))
    return decompose


_POOL_ATTRS = {"kernel": Attr("axes", required=True), "stride": Attr("axes", None),
               "padding": Attr("axes", 0)}

composite("max_pool2d", 1, lambda ops, a: ops[0].type.dtype, _pool_shape("max_pool2d"),
          lambda x, kernel, stride=None, padding=0: _pool_windows_np(
              "max_pool2d", x, {"kernel": kernel, "stride": stride, "padding": padding},
              -np.inf).max(axis=(4, 5)),
          _pool_decompose("max_pool2d", "max", float("-inf")), _POOL_ATTRS,
          "the largest value of each kernel window of images [N, C, H, W] (stride = kernel)")
composite("avg_pool2d", 1, lambda ops, a: ops[0].type.dtype, _pool_shape("avg_pool2d"),
          lambda x, kernel, stride=None, padding=0: _pool_windows_np(
              "avg_pool2d", x, {"kernel": kernel, "stride": stride, "padding": padding},
              0.0).mean(axis=(4, 5)),
          _pool_decompose("avg_pool2d", "mean", 0.0), _POOL_ATTRS,
          "the mean of each kernel window of images [N, C, H, W], padding counted (stride = kernel)")


def _layer_norm_shape(ops, attrs):
    x, gamma, beta = ops
    if x.type.ndim < 1 or isinstance(x.type.shape[-1], str):
        raise TypeError_(f"layer_norm: the last axis of {x} must have a known size")
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p.type.shape != (x.type.shape[-1],):
            raise TypeError_(f"layer_norm: {name} must be [{x.type.shape[-1]}], one per feature "
                             f"of the last axis: {p}")
    return x.type.shape


def _layer_norm_np(x, gamma, beta, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)          # biased, as PyTorch normalizes
    return (x - mean) / np.sqrt(var + x.dtype.type(eps)) * gamma + beta


def _layer_norm_decompose(emit, inputs, attrs):
    x, gamma, beta = inputs
    centered = emit("sub", x, emit("mean", x, axis=-1, keepdims=True))
    var = emit("mean", emit("mul", centered, centered), axis=-1, keepdims=True)
    scale = emit("sqrt", emit("add", var, emit.const(attrs["eps"], x.dtype)))
    return emit("add", emit("mul", emit("div", centered, scale), gamma), beta)


composite("layer_norm", 3, lambda ops, a: same_dtype("layer_norm", ops), _layer_norm_shape,
          _layer_norm_np, _layer_norm_decompose, {"eps": Attr("float", 1e-5)},
          "each row normalized over the last axis (mean 0, variance 1), then * gamma + beta")


# --- batch norm (PyTorch's BatchNorm1d / BatchNorm2d) ------------------------------------------------

def _channel_axes(name: str, x: Operand) -> tuple[int, ...]:
    """The axes batch statistics run over: all but the channel axis 1 of [N, C] or [N, C, H, W]."""
    if x.type.ndim not in (2, 4) or any(isinstance(d, str) for d in x.type.shape[1:]):
        raise TypeError_(f"{name}: needs [N, C] features or [N, C, H, W] images with known sizes "
                         f"past the batch axis: {x}")
    if not x.type.dtype.is_float:
        raise TypeError_(f"{name}: needs floating-point values: {x}")
    return (0,) if x.type.ndim == 2 else (0, 2, 3)


def _per_channel(name: str, x: Operand, ops) -> None:
    c = x.type.shape[1]
    for p in ops:
        if p.type.shape != (c,):
            raise TypeError_(f"{name}: {p} must be [{c}], one value per channel of {x}")


def _batch_norm_shape(ops, attrs):
    _channel_axes("batch_norm", ops[0])
    _per_channel("batch_norm", ops[0], ops[1:])
    return ops[0].type.shape


def _channels_np(v, ndim):
    return v if ndim == 2 else v[:, None, None]


def _batch_norm_np(x, gamma, beta, mean, var, eps=1e-5, train=False):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    if train:
        mean, var = x.mean(axis=axes), x.var(axis=axes)       # biased, as PyTorch normalizes
    eps = x.dtype.type(eps)
    c = lambda v: _channels_np(v, x.ndim)                     # noqa: E731
    return (x - c(mean)) / np.sqrt(c(var) + eps) * c(gamma) + c(beta)


def _channels(emit, v: Node, ndim: int) -> Node:
    return v if ndim == 2 else emit("reshape", v, shape=(v.shape[0], 1, 1))


def _batch_moments(emit, x: Node) -> tuple[Node, Node, tuple[int, ...]]:
    """x minus its batch mean, and the biased batch variance (both keeping the reduced axes).
    batch_norm and running_stat build them alike, so CSE computes them once per step."""
    axes = (0,) if x.type.ndim == 2 else (0, 2, 3)
    centered = emit("sub", x, emit("mean", x, axis=axes, keepdims=True))
    return centered, emit("mean", emit("mul", centered, centered), axis=axes, keepdims=True), axes


def _batch_norm_decompose(emit, inputs, attrs):
    x, gamma, beta, mean, var = inputs
    eps = emit.const(attrs["eps"], x.dtype)
    if attrs["train"]:
        centered, var, _ = _batch_moments(emit, x)
    else:
        centered, var = emit("sub", x, _channels(emit, mean, x.type.ndim)), _channels(emit, var, x.type.ndim)
    scaled = emit("div", centered, emit("sqrt", emit("add", var, eps)))
    return emit("add", emit("mul", scaled, _channels(emit, gamma, x.type.ndim)),
                _channels(emit, beta, x.type.ndim))


composite("batch_norm", 5, lambda ops, a: same_dtype("batch_norm", ops), _batch_norm_shape,
          _batch_norm_np, _batch_norm_decompose,
          {"eps": Attr("float", 1e-5), "train": Attr("bool", False)},
          "(x - mean) / sqrt(var + eps) * gamma + beta per channel (axis 1): the batch's own "
          "statistics in training, the given (running) ones in evaluation")


def _running_stat_shape(ops, attrs):
    if attrs["stat"] not in ("mean", "var"):
        raise TypeError_(f"running_stat: stat must be \"mean\" or \"var\", got \"{attrs['stat']}\"",
                         attr="stat")
    if not 0.0 <= attrs["momentum"] <= 1.0:
        raise TypeError_(f"running_stat: momentum must be in [0, 1], got {attrs['momentum']}",
                         attr="momentum")
    _channel_axes("running_stat", ops[0])
    _per_channel("running_stat", ops[0], ops[1:])
    return ops[1].type.shape


def _running_stat_np(x, running, stat="mean", momentum=0.1):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    batch = x.mean(axis=axes) if stat == "mean" else x.var(axis=axes, ddof=1)
    return (1 - momentum) * running + momentum * batch


def _running_stat_decompose(emit, inputs, attrs):
    x, running = inputs
    centered, var, axes = _batch_moments(emit, x)
    if attrs["stat"] == "mean":
        batch = emit("reshape", emit("mean", x, axis=axes, keepdims=True), shape=running.shape)
    else:
        # The running estimate is unbiased: n / (n - 1) times the variance batch norm divides by.
        n = emit("size", x, axis=axes, dtype=x.dtype.value)
        unbiased = emit("div", emit("mul", var, n), emit("sub", n, emit.const(1.0, x.dtype)))
        batch = emit("reshape", unbiased, shape=running.shape)
    m = attrs["momentum"]
    return emit("add", emit("mul", running, emit.const(1.0 - m, x.dtype)),
                emit("mul", batch, emit.const(m, x.dtype)))


composite("running_stat", 2, lambda ops, a: same_dtype("running_stat", ops), _running_stat_shape,
          _running_stat_np, _running_stat_decompose,
          {"stat": Attr("str", "mean"), "momentum": Attr("float", 0.1)},
          "a running estimate moved toward this batch's per-channel mean or unbiased variance: "
          "(1 - momentum) * running + momentum * batch (what a training step of batch norm stores)")


def _embedding_dtype(ops, attrs):
    indices, table = ops
    if not indices.type.dtype.is_int:
        raise TypeError_(f"embedding: the indices must be integers: {indices}")
    if not table.type.dtype.is_float or table.type.ndim != 2:
        raise TypeError_(f"embedding: the table must be a float matrix [vocab, dim]: {table}")
    return table.type.dtype


def _embedding_np(indices, table):
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= table.shape[0]):
        bad = indices[(indices < 0) | (indices >= table.shape[0])].flat[0]
        raise ValueError(f"index {int(bad)} is out of range [0, {table.shape[0]})")
    return table[indices]


def _embedding_decompose(emit, inputs, attrs):
    # Row lookup as one_hot(indices) @ table: its gradient (one_hot^T @ g) adds the rows up
    # where an index repeats, with no scatter op. The cost grows with the vocabulary.
    indices, table = inputs
    rows = emit("one_hot", indices, depth=table.shape[0], dtype=table.dtype.value)
    return emit("matmul", rows, table)


composite("embedding", 2, _embedding_dtype,
          lambda ops, a: ops[0].type.shape + (ops[1].type.shape[1],),
          _embedding_np, _embedding_decompose, {},
          "rows of table picked by integer indices (indices.shape + [dim])")


def _prelu_slope_shape(x: TensorType, a: TensorType):
    # PyTorch's PReLU: one slope per channel, the channel being axis 1 (NCHW or [N, C]).
    if a.ndim == 1 and x.ndim > 2 and a.shape[0] != 1:
        return (a.shape[0],) + (1,) * (x.ndim - 2)
    return a.shape


def _prelu_shape(ops, attrs):
    x, a = ops
    if a.type.ndim > 1:
        raise TypeError_(f"prelu: the slope must be a scalar or a vector of channels: {a}")
    if a.type.ndim == 1 and a.type.shape[0] not in (1,) and (x.type.ndim < 2
                                                             or x.type.shape[1] != a.type.shape[0]):
        raise TypeError_(f"prelu: one slope per channel (axis 1) expected: {x}, {a}")
    return x.type.shape


def _prelu_np(x, a):
    a = a.reshape(_prelu_slope_shape(TensorType(DType.f64, x.shape), TensorType(DType.f64, a.shape)))
    return np.where(x > 0, x, a * x)


def _prelu_decompose(emit, inputs, attrs):
    x, a = inputs
    shape = _prelu_slope_shape(x.type, a.type)
    if shape != a.shape:
        a = emit("reshape", a, shape=shape)
    return emit("where", emit("greater", x, emit.const(0.0, x.dtype)), x, emit("mul", x, a))


composite("prelu", 2, lambda ops, a: float_dtype("prelu", ops), _prelu_shape, _prelu_np,
          _prelu_decompose, doc="leaky ReLU with a learned slope (per channel or shared)")


def _linear_shape(ops, attrs):
    shape = matmul_shape(ops[0], ops[1])
    if len(ops) == 3:
        shape = broadcast("linear", [Operand(ops[0].type.with_shape(shape), "x @ W"), ops[2]])
    return shape


def _linear_decompose(emit, inputs, attrs):
    y = emit("matmul", inputs[0], inputs[1])
    return emit("add", y, inputs[2]) if len(inputs) == 3 else y


composite("linear", (2, 3), lambda ops, a: same_dtype("linear", ops), _linear_shape,
          lambda x, w, b=None: x @ w if b is None else x @ w + b, _linear_decompose,
          doc="x @ W + b")


def _flatten_shape(ops, attrs):
    shape = ops[0].type.shape
    if len(shape) < 2:
        raise TypeError_(f"flatten: needs a batch axis and at least one more: {ops[0]}")
    rest = 1
    for d in shape[1:]:
        if isinstance(d, str):
            raise TypeError_(f"flatten: only the batch axis may be symbolic: {ops[0]}")
        rest *= d
    return (shape[0], rest)


composite("flatten", 1, lambda ops, a: ops[0].type.dtype, _flatten_shape,
          lambda x: x.reshape(x.shape[0], -1),
          lambda emit, inputs, attrs: emit("reshape", inputs[0], shape=_flatten_shape(
              [Operand(inputs[0].type, "x")], {})),
          doc="[N, ...] -> [N, prod(...)], keeping the batch axis")


# --- losses (averaged over the batch, as PyTorch's defaults are) ----------------------------------

def _same_shape_loss(name):
    def rule(ops, attrs):
        a, b = ops
        if a.type.shape != b.type.shape:
            raise TypeError_(f"{name}: shapes differ: {a}, {b}",
                             hint="the prediction and the target must have the same shape")
        return ()
    return rule


def _mse_decompose(emit, inputs, attrs):
    d = emit("sub", inputs[0], inputs[1])
    return emit("mean", emit("mul", d, d))


composite("mse", 2, lambda ops, a: float_dtype("mse", ops), _same_shape_loss("mse"),
          lambda f, t: np.mean((f - t) ** 2), _mse_decompose,
          doc="mean squared error over all elements")


def _class_loss_rule(name, what):
    def dtype_rule(ops, attrs):
        scores, labels = ops
        if not scores.type.dtype.is_float:
            raise TypeError_(f"{name}: {what} must be floating point: {scores}")
        if not labels.type.dtype.is_int:
            raise TypeError_(f"{name}: labels must be integer class indices: {labels}",
                             hint=f"declare {labels.label} as i64[N]")
        return scores.type.dtype

    def shape_rule(ops, attrs):
        scores, labels = ops
        if scores.type.ndim != 2:
            raise TypeError_(f"{name}: {what} must be [batch, classes]: {scores}")
        if labels.type.ndim != 1:
            raise TypeError_(f"{name}: labels must be [batch]: {labels}")
        if scores.type.shape[0] != labels.type.shape[0]:
            raise TypeError_(f"{name}: batch sizes differ: {scores}, {labels} "
                             f"({scores.type.shape[0]} != {labels.type.shape[0]})")
        return ()
    return dtype_rule, shape_rule


def _nll_np(logp, y):
    return -np.mean(logp[np.arange(len(y)), y])


def _nll_decompose(emit, inputs, attrs):
    logp, y = inputs
    picked = emit("sum", emit("mul", logp, emit("one_hot", y, depth=logp.shape[1],
                                                dtype=logp.dtype.value)), axis=1)
    return emit("neg", emit("mean", picked))


composite("nll", 2, *_class_loss_rule("nll", "log-probabilities"), _nll_np, _nll_decompose,
          doc="negative log-likelihood of integer labels under log-probabilities")
composite("cross_entropy", 2, *_class_loss_rule("cross_entropy", "logits"),
          lambda z, y: _nll_np(_np_log_softmax(z, 1), y),
          lambda emit, inputs, attrs: _nll_decompose(
              emit, [_log_softmax_decompose(emit, inputs[:1], {"axis": 1}), inputs[1]], {}),
          doc="cross-entropy of integer labels under logits (log_softmax + nll)")


def _bce_np(z, t):
    return np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))


def _bce_decompose(emit, inputs, attrs):
    z, t = inputs
    zero = emit.const(0.0, z.dtype)
    soft = emit("log1p", emit("exp", emit("neg", emit("abs", z))))
    return emit("mean", emit("add", emit("sub", emit("maximum", z, zero), emit("mul", z, t)), soft))


composite("binary_cross_entropy_with_logits", 2,
          lambda ops, a: float_dtype("binary_cross_entropy_with_logits", ops),
          _same_shape_loss("binary_cross_entropy_with_logits"), _bce_np, _bce_decompose,
          doc="logistic negative log-likelihood of 0/1 targets under logits")


# --- regularizers ---------------------------------------------------------------------------------

def _norm_composite(name, np_term, term_decompose, doc):
    def decompose(emit, inputs, attrs):
        total = None
        for x in inputs:
            s = emit("sum", term_decompose(emit, x))
            total = s if total is None else emit("add", total, s)
        return total
    composite(name, (1, None), lambda ops, a: float_dtype(name, ops), _scalar,
              lambda *xs: sum(np.sum(np_term(x)) for x in xs), decompose, doc=doc)


_norm_composite("l2", np.square, lambda emit, x: emit("mul", x, x),
                "sum of squares of every element (squared Frobenius norm)")
_norm_composite("l1", np.abs, lambda emit, x: emit("abs", x), "sum of absolute values")


def decompose_node(node: Node, inputs: Sequence[Node]) -> Node:
    """The primitive form of a composite node over (already decomposed) inputs."""
    op = op_table.OPS[node.op]
    emit = Emit(node.loc, node.tags)
    out = op.decompose(emit, list(inputs), node.attr)
    assert out.type == node.type, (f"internal error: decomposition of {node.op} gives {out.type}, "
                                   f"expected {node.type}")
    return op_table.renamed(out, node.name, node.loc)


# --- mode-dependent ops ---------------------------------------------------------------------------
# An op with a `train` attribute behaves differently in training; `passes.train_mode` sets it on
# every such node of a training graph, so one model graph yields both programs.


def rng_key(emit: Emit) -> Node:
    """The per-step random key that training programs are fed (graphc.ir.contract.RNG_INPUT)."""
    return op_table.source("input", TensorType(DType.i64, ()), loc=emit.loc, name=RNG_INPUT)


def _dropout_decompose(emit, inputs, attrs):
    (x,) = inputs
    if not attrs["train"] or attrs["p"] == 0.0:
        return x
    keep = emit("greater_equal", emit("uniform", rng_key(emit), shape=x.shape,
                                      stream=attrs["stream"], dtype=x.dtype.value),
                emit.const(attrs["p"], x.dtype))
    # Inverted dropout: scale the kept units in training so evaluation needs no rescaling.
    return emit("where", keep, emit("mul", x, emit.const(1.0 / (1.0 - attrs["p"]), x.dtype)),
                emit.const(0.0, x.dtype))


def _dropout_np(x, p=0.5, stream=0, train=False, key=None):
    """The oracle; in training it needs the step's key, which the graph takes as input #rng."""
    if not train or p == 0.0:
        return x
    u = op_table.OPS["uniform"].numpy(key, shape=x.shape, stream=stream, dtype="f64")
    return np.where(u >= x.dtype.type(p), x * x.dtype.type(1.0 / (1.0 - p)), 0).astype(x.dtype)


composite("dropout", 1, lambda ops, a: float_dtype("dropout", ops), lambda ops, a: _same_shape(ops),
          _dropout_np, _dropout_decompose,
          {"p": Attr("float", 0.5), "stream": Attr("int", 0), "train": Attr("bool", False)},
          "inverted dropout with probability p in training (masks hashed from the step's key "
          "and the op's stream); the identity in evaluation")
