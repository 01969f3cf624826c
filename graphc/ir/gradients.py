"""Gradient rules: for each differentiable primitive, the gradient of each input given the
gradient `g` of the output, as graph nodes. Rules ignore broadcasting (the reverse walk sums each
result back to its input's shape), accumulation over several uses and arity: the walk does those.

A rule is `rule(emit, node, g, wants) -> [grad or None per input]`; `wants[i]` says whether input
i needs one. Ops with integer or bool results (comparisons, one_hot), stop_gradient and size (a
count of elements, which depends on the shape alone) have no rule: nothing flows back through them.
"""
from __future__ import annotations

import dataclasses
import math

from graphc.ir.emit import Emit
from graphc.ir.node import Node
from graphc.ir.ops import OPS, apply
from graphc.ir.shapes import reduced_shape
from graphc.ir.types import dim_factors, product_dim


def _zero(e: Emit, like: Node) -> Node:
    return e.const(0.0, like.dtype)


def _mask(e: Emit, cond: Node, g: Node) -> Node:
    """g where cond, else 0."""
    return e("where", cond, g, _zero(e, g))


def _swap_last(e: Emit, x: Node) -> Node:
    axes = tuple(range(x.type.ndim - 2)) + (x.type.ndim - 1, x.type.ndim - 2)
    return e("transpose", x, axes=axes)


def _matmul(e, node, g, wants):
    a, b = node.inputs
    if a.type.ndim == 1 and b.type.ndim == 1:               # dot product: g is a scalar
        return [e("mul", g, b) if wants[0] else None, e("mul", g, a) if wants[1] else None]
    if a.type.ndim == 1:                                   # [k] @ [..., k, m] -> [..., m]
        g2 = e("reshape", g, shape=g.shape[:-1] + (1, g.shape[-1]))
        a2 = e("reshape", a, shape=(1, a.shape[0]))
        da = e("reshape", e("matmul", g2, _swap_last(e, b)), shape=g.shape[:-1] + (a.shape[0],))
        return [da if wants[0] else None,
                e("matmul", _swap_last(e, a2), g2) if wants[1] else None]
    if b.type.ndim == 1:                                   # [..., n, k] @ [k] -> [..., n]
        g2 = e("reshape", g, shape=g.shape + (1,))
        b2 = e("reshape", b, shape=(1, b.shape[0]))
        t = e("matmul", _swap_last(e, a), g2)
        db = e("reshape", t, shape=t.shape[:-1])
        return [e("matmul", g2, b2) if wants[0] else None, db if wants[1] else None]
    if b.type.ndim == 2 and a.type.ndim > 2 and wants[1]:
        # [..., m, k] @ [k, n] (a layer over a sequence): the weight's gradient is one product over
        # every row, not one per batch element summed afterwards.
        rows = product_dim(*_times(a.shape[:-1]))
        a2 = e("reshape", a, shape=(rows, a.shape[-1]))
        g2 = e("reshape", g, shape=(rows, g.shape[-1]))
        return [e("matmul", g, _swap_last(e, b)) if wants[0] else None,
                e("matmul", _swap_last(e, a2), g2)]
    da = None
    if wants[0]:
        if _known(a) and _columns(b):
            # A convolution's weight [O, C*kh*kw] times its columns [C*kh*kw, N*OH*OW]: the
            # weight's gradient, a sum over every pixel of the batch, comes out of OpenBLAS
            # about 10% faster as [C*kh*kw, O] (docs/backends.md, "Convolutions"); it is small,
            # and the update reads it transposed (a view).
            da = _swap_last(e, e("matmul", b, _swap_last(e, g)))
        else:
            da = e("matmul", g, _swap_last(e, b))
    return [da, e("matmul", _swap_last(e, a), g) if wants[1] else None]


def _known(a: Node) -> bool:
    """a is a matrix of known size (a weight)."""
    return a.type.ndim == 2 and all(isinstance(d, int) for d in a.shape)


def _columns(b: Node) -> bool:
    """b is a convolution's columns: [C*kh*kw, N*OH*OW] laid out from a `window` view
    (composites_conv.py: a reshape of a transpose of the windows, or of a group's slice)."""
    if b.type.ndim != 2 or not isinstance(b.shape[0], int) or b.op != "reshape":
        return False
    x = b.inputs[0]
    if x.op != "transpose":
        return False
    x = x.inputs[0]
    return x.op == "window" or (x.op == "slice" and x.inputs[0].op == "window")


def _times(dims) -> tuple[int, list[str]]:
    coef, syms = 1, []
    for d in dims:
        c, s = dim_factors(d)
        coef, syms = coef * c, syms + list(s)
    return coef, syms


def _keepdims_grad(e: Emit, node: Node, g: Node) -> Node:
    """g (a reduction's gradient) reshaped to keep the reduced axes, then broadcast back."""
    x = node.inputs[0]
    axis = node.attr["axis"]
    axes = tuple(range(x.type.ndim)) if axis is None else \
        tuple(a % x.type.ndim for a in (axis if isinstance(axis, tuple) else (axis,)))
    kept = reduced_shape(x.shape, axes, keepdims=True)
    if g.shape != kept:
        g = e("reshape", g, shape=kept)
    return e("broadcast_to", g, shape=x.shape)


def _sum(e, node, g, wants):
    return [_keepdims_grad(e, node, g)]


def _mean(e, node, g, wants):
    x = node.inputs[0]
    count = e("size", x, axis=node.attr["axis"], dtype=x.dtype.value)
    return [e("div", _keepdims_grad(e, node, g), count)]


def _max(e, node, g, wants):
    # Ties share the gradient equally, as PyTorch's amax does.
    x = node.inputs[0]
    top = _keepdims_grad(e, node, node)
    hit = e("cast", e("equal", x, top), dtype=x.dtype.value)
    ties = _keepdims_grad(e, node, e("sum", hit, axis=node.attr["axis"],
                                     keepdims=node.attr["keepdims"]))
    return [e("div", e("mul", _keepdims_grad(e, node, g), hit), ties)]


def _pow(e, node, g, wants):
    a, b = node.inputs
    one = e.const(1.0, a.dtype)
    da = e("mul", g, e("mul", b, e("pow", a, e("sub", b, one)))) if wants[0] else None
    db = e("mul", g, e("mul", node, e("log", a))) if wants[1] else None
    return [da, db]


def _transpose(e, node, g, wants):
    axes = node.attr["axes"]
    ndim = node.inputs[0].type.ndim
    perm = tuple(reversed(range(ndim))) if axes is None else tuple(a % ndim for a in axes)
    inverse = tuple(sorted(range(ndim), key=lambda i: perm[i]))
    return [e("transpose", g, axes=inverse)]


def _concat(e, node, g, wants):
    axis = node.attr["axis"] % node.type.ndim
    out, start = [], 0
    for x, want in zip(node.inputs, wants):
        stop = start + x.shape[axis]
        out.append(e("slice", g, axis=axis, start=start, stop=stop) if want else None)
        start = stop
    return out


def _window_attrs(node: Node) -> dict:
    return {k: node.attr[k] for k in ("kernel", "stride", "dilation")}


def _window(e, node, g, wants):
    x = node.inputs[0]
    k = len(node.attr["kernel"])
    return [e("window_add", g, size=x.shape[x.type.ndim - k:], **_window_attrs(node))]


def _pad(e, node, g, wants):
    x = node.inputs[0]
    for axis, (lo, n) in enumerate(zip(node.attr["low"], x.shape)):
        if g.shape[axis] != n:
            g = e("slice", g, axis=axis, start=lo, stop=lo + n)
    return [g]


def _slice(e, node, g, wants):
    x = node.inputs[0]
    axis = node.attr["axis"] % x.type.ndim
    low, high = [0] * x.type.ndim, [0] * x.type.ndim
    low[axis], high[axis] = node.attr["start"], x.shape[axis] - node.attr["stop"]
    return [e("pad", g, low=tuple(low), high=tuple(high), value=0.0)]


def _abs(e, node, g, wants):
    x = node.inputs[0]
    zero = _zero(e, x)
    return [e("where", e("greater", x, zero), g,
              e("where", e("less", x, zero), e("neg", g), _zero(e, g)))]


RULES = {
    "add": lambda e, n, g, w: [g, g],
    "sub": lambda e, n, g, w: [g, e("neg", g) if w[1] else None],
    "mul": lambda e, n, g, w: [e("mul", g, n.inputs[1]) if w[0] else None,
                               e("mul", g, n.inputs[0]) if w[1] else None],
    "div": lambda e, n, g, w: [e("div", g, n.inputs[1]) if w[0] else None,
                               e("neg", e("div", e("mul", g, n), n.inputs[1])) if w[1] else None],
    "pow": _pow,
    "maximum": lambda e, n, g, w: [_mask(e, e("greater_equal", *n.inputs), g),
                                   _mask(e, e("less", *n.inputs), g)],
    "minimum": lambda e, n, g, w: [_mask(e, e("less_equal", *n.inputs), g),
                                   _mask(e, e("greater", *n.inputs), g)],
    "neg": lambda e, n, g, w: [e("neg", g)],
    "exp": lambda e, n, g, w: [e("mul", g, n)],
    "log": lambda e, n, g, w: [e("div", g, n.inputs[0])],
    "erf": lambda e, n, g, w: [e("mul", g, e("mul", e.const(2.0 / math.sqrt(math.pi), n.dtype),
                                               e("exp", e("neg", e("mul", n.inputs[0], n.inputs[0])))))],
    "log1p": lambda e, n, g, w: [e("div", g, e("add", n.inputs[0], e.const(1.0, n.dtype)))],
    "sqrt": lambda e, n, g, w: [e("div", g, e("mul", n, e.const(2.0, n.dtype)))],
    "abs": _abs,
    # Both written with the output y, which is bounded: no overflow at large |x|.
    "tanh": lambda e, n, g, w: [e("mul", g, e("sub", e.const(1.0, n.dtype), e("mul", n, n)))],
    "sigmoid": lambda e, n, g, w: [e("mul", g, e("mul", n, e("sub", e.const(1.0, n.dtype), n)))],
    # relu(x) > 0 exactly where x > 0: the mask reads the output, so the input (a layer's
    # pre-activation) is not kept for the backward pass and fuses with the relu
    "relu": lambda e, n, g, w: [_mask(e, e("greater", n, _zero(e, n)), g)],
    "where": lambda e, n, g, w: [None, _mask(e, n.inputs[0], g) if w[1] else None,
                                 e("where", n.inputs[0], _zero(e, g), g) if w[2] else None],
    "cast": lambda e, n, g, w: [e("cast", g, dtype=n.inputs[0].dtype.value)],
    "matmul": _matmul,
    "sum": _sum,
    "mean": _mean,
    "max": _max,
    "reshape": lambda e, n, g, w: [e("reshape", g, shape=n.inputs[0].shape)],
    "transpose": _transpose,
    "concat": _concat,
    "broadcast_to": lambda e, n, g, w: [g],     # the walk sums g back to the input's shape
    "window": _window,
    "window_add": lambda e, n, g, w: [e("window", g, **_window_attrs(n))],
    "pad": _pad,
    "slice": _slice,
    # The ranks' losses add up (each a mean over its shard, `mean` divides by the ranks): what
    # reaches a rank's copy of x is every rank's g, reduced the same way.
    "all_reduce": lambda e, n, g, w: [apply("all_reduce", [g], {"op": n.attr["op"]}, loc=e.loc,
                                            tags=e.tags)],
    "causal_mask": lambda e, n, g, w: [e("causal_mask", g, value=0.0)],
}


def install() -> None:
    for name, rule in RULES.items():
        if rule is not None:
            OPS[name] = dataclasses.replace(OPS[name], grad=rule)


install()
