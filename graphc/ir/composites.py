"""Composite ops: declared in the op table like primitives (rules, numpy reference) and decomposed
into primitives by the `decompose` pass; this module holds the declaration helper, `decompose_node`
and the activations. The other families live in composites_conv.py, composites_layers.py and
composites_losses.py. The numpy references are the oracles the tests hold the decompositions to;
fused kernels recover the speed of the decomposed forms.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from graphc.ir import ops as op_table
from graphc.ir.emit import Emit
from graphc.ir.node import Node
from graphc.ir.ops import Attr, OpDef, TypeError_, register
from graphc.ir.primitives import erf
from graphc.ir.shapes import float_dtype, normalize_axis


def composite(name, arity, dtype_rule, shape_rule, numpy_ref, decompose, attrs=None, doc=""):
    register(OpDef(name, arity, dtype_rule, shape_rule, numpy_ref, attrs=attrs or {},
                   kind="composite", decompose=decompose, doc=doc))


def same_shape(ops):
    return ops[0].type.shape


def scalar_shape(ops, attrs):
    return ()


def decompose_node(node: Node, inputs: Sequence[Node]) -> Node:
    """The primitive form of a composite node over (already decomposed) inputs."""
    op = op_table.OPS[node.op]
    emit = Emit(node.loc, node.tags)
    out = op.decompose(emit, list(inputs), node.attr)
    assert out.type == node.type, (f"internal error: decomposition of {node.op} gives {out.type}, "
                                   f"expected {node.type}")
    return out.relabeled(name=node.name, loc=node.loc or out.loc)


# --- activations and normalizers ------------------------------------------------------------------

def _axis_attr_rule(name):
    def rule(ops, attrs):
        normalize_axis(name, ops[0], attrs["axis"])
        return ops[0].type.shape
    return rule


def np_log_softmax(x, axis):
    s = x - np.max(x, axis=axis, keepdims=True)
    return s - np.log(np.sum(np.exp(s), axis=axis, keepdims=True))


def _shifted(emit: Emit, x: Node, axis: int) -> Node:
    # The max is a constant shift: it cancels in the result, so no gradient flows through it.
    m = emit("stop_gradient", emit("max", x, axis=axis, keepdims=True))
    return emit("sub", x, m)


def _softmax_decompose(emit, inputs, attrs):
    e = emit("exp", _shifted(emit, inputs[0], attrs["axis"]))
    return emit("div", e, emit("sum", e, axis=attrs["axis"], keepdims=True))


def log_softmax_decompose(emit, inputs, attrs):
    s = _shifted(emit, inputs[0], attrs["axis"])
    return emit("sub", s, emit("log", emit("sum", emit("exp", s), axis=attrs["axis"], keepdims=True)))


composite("softmax", 1, lambda ops, a: float_dtype("softmax", ops), _axis_attr_rule("softmax"),
          lambda x, axis: np.exp(np_log_softmax(x, axis)), _softmax_decompose,
          {"axis": Attr("axis", -1)}, "exp(x) / sum(exp(x)) along an axis, shifted by the max")
composite("log_softmax", 1, lambda ops, a: float_dtype("log_softmax", ops),
          _axis_attr_rule("log_softmax"), np_log_softmax, log_softmax_decompose,
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

