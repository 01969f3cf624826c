"""Composite ops: the layers' building blocks: layer norm, batch norm and its running statistics,
embedding lookup, PReLU, linear, flatten."""
from __future__ import annotations

import numpy as np

from graphc.ir.composites import composite
from graphc.ir.node import Node
from graphc.ir.ops import Attr, Operand, TypeError_
from graphc.ir.shapes import broadcast, float_dtype, matmul_shape, same_dtype
from graphc.ir.types import DType, TensorType


def _layer_norm_shape(ops, attrs):
    x = ops[0]
    if x.type.ndim < 1 or isinstance(x.type.shape[-1], str):
        raise TypeError_(f"layer_norm: the last axis of {x} must have a known size")
    for name, p in zip(("gamma", "beta"), ops[1:]):
        if p.type.shape != (x.type.shape[-1],):
            raise TypeError_(f"layer_norm: {name} must be [{x.type.shape[-1]}], one per feature "
                             f"of the last axis: {p}")
    return x.type.shape


def _layer_norm_np(x, gamma, beta=None, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)          # biased, as PyTorch normalizes
    scaled = (x - mean) / np.sqrt(var + x.dtype.type(eps)) * gamma
    return scaled if beta is None else scaled + beta


def _layer_norm_decompose(emit, inputs, attrs):
    x, gamma = inputs[:2]
    centered = emit("sub", x, emit("mean", x, axis=-1, keepdims=True))
    var = emit("mean", emit("mul", centered, centered), axis=-1, keepdims=True)
    scale = emit("sqrt", emit("add", var, emit.const(attrs["eps"], x.dtype)))
    scaled = emit("mul", emit("div", centered, scale), gamma)
    return scaled if len(inputs) == 2 else emit("add", scaled, inputs[2])


composite("layer_norm", (2, 3), lambda ops, a: same_dtype("layer_norm", ops), _layer_norm_shape,
          _layer_norm_np, _layer_norm_decompose, {"eps": Attr("float", 1e-5)},
          "each row normalized over the last axis (mean 0, variance 1), then * gamma (+ beta)")


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


