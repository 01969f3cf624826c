"""`graphc import`'s handlers of the network layers: Conv (the conv2d op), MaxPool and
AveragePool (graphc's 2-D pools, else reductions over `window`s), BatchNormalization (the
batchnorm layer with its parameters given) and LayerNormalization (layer_norm, or its formula)."""
from __future__ import annotations

import math

import numpy as np

from graphc.onnx.import_types import (
    FLT_MAX,
    ImportError_,
    Value,
    attr_number,
    attributes,
    fmt_list,
    handler,
    is_const,
    number,
    opts,
)

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
    options = opts(stride=strides if strides != [1, 1] else None,
                   padding=pads[:2] if pads[:2] != [0, 0] else None,
                   dilation=dil if dil != [1, 1] else None, groups=group if group != 1 else None)
    imp.emit(node.output[0], f"conv2d({', '.join(args)}{options})", x.dtype,
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
        padding = opts(padding=low) if low != [0, 0] else ""
        shape = x.shape[:2] + tuple((n + 2 * p - k) // s + 1
                                    for n, p, k, s in zip(x.shape[2:], low, kernel, strides))
        imp.emit(node.output[0], f"{fn}({x.name}, {fmt_list(kernel)}{opts(stride=strides)}"
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
    if axis == x.ndim - 1 and not extra and g.shape == x.shape[-1:] \
            and (not has_b or b_shape == x.shape[-1:]):
        b = f", {imp.tensor(node.input[2]).name}" if has_b else ""
        imp.emit(node.output[0], f"layer_norm({x.name}, {g.name}{b}, eps={eps})", x.dtype, x.shape)
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
