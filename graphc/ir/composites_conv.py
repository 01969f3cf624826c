"""Composite ops: 2-d convolution and pooling (PyTorch's argument names and NCHW layout)."""
from __future__ import annotations

import numpy as np

from graphc.ir.composites import composite
from graphc.ir.ops import Attr, Operand, TypeError_
from graphc.ir.primitives import sliding_windows, window_out
from graphc.ir.shapes import same_dtype
from graphc.ir.types import dim_factors, product_dim

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

