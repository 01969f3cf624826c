"""Composite ops: the losses (averaged over the batch, as PyTorch's defaults are), the l1/l2
regularizers and the mode-dependent dropout."""
from __future__ import annotations

import numpy as np

from graphc.ir import ops as op_table
from graphc.ir.composites import composite, log_softmax_decompose, np_log_softmax, same_shape, scalar_shape
from graphc.ir.contract import RNG_INPUT
from graphc.ir.emit import Emit
from graphc.ir.node import Node
from graphc.ir.ops import Attr, TypeError_
from graphc.ir.shapes import float_dtype
from graphc.ir.types import DType, TensorType

# --- losses (averaged over the batch, as PyTorch's defaults are) ----------------------------------

def _same_shape_loss(name):
    def rule(ops, attrs):
        a, b = ops
        if a.type.shape != b.type.shape:
            raise TypeError_(f"{name}: shapes differ: {a}, {b}",
                             hint="the prediction and the target must have the same shape")
        return ()
    return rule


def _target_dtype(name):
    """Both operands floating point; integer targets beside float predictions are class labels,
    which these losses take as one-hot rows (a cast would compare scores with class numbers)."""
    def rule(ops, attrs):
        pred, target = ops
        if pred.type.dtype.is_float and not target.type.dtype.is_float:
            classes = pred.type.shape[-1] if pred.type.ndim == target.type.ndim + 1 else None
            one_hot = (f"one_hot({target.label}, {classes})" if isinstance(classes, int)
                       else f"one_hot({target.label}, CLASSES)")
            raise TypeError_(f"{name}: the target is integer class labels: {target}, against "
                             f"{pred}",
                             hint=f"compare with one-hot rows, {name}({pred.label}, {one_hot}), "
                                  f"or use cross_entropy({pred.label}, {target.label}) on scores")
        return float_dtype(name, ops)
    return rule


def _mse_decompose(emit, inputs, attrs):
    d = emit("sub", inputs[0], inputs[1])
    return emit("mean", emit("mul", d, d))


composite("mse", 2, _target_dtype("mse"), _same_shape_loss("mse"),
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
        # [batch, classes] against [batch], or a sequence's [batch, T, classes] against [batch, T]
        # (a language model: the mean runs over every position).
        scores, labels = ops
        if scores.type.ndim not in (2, 3):
            raise TypeError_(f"{name}: {what} must be [batch, classes] or [batch, T, classes]: "
                             f"{scores}")
        if labels.type.ndim != scores.type.ndim - 1:
            want = "[batch]" if scores.type.ndim == 2 else "[batch, T]"
            raise TypeError_(f"{name}: labels must be {want} beside {scores}: {labels}")
        for axis, what_axis in enumerate(("batch sizes", "sequence lengths")[:labels.type.ndim]):
            if scores.type.shape[axis] != labels.type.shape[axis]:
                raise TypeError_(f"{name}: {what_axis} differ: {scores}, {labels} "
                                 f"({scores.type.shape[axis]} != {labels.type.shape[axis]})")
        return ()
    return dtype_rule, shape_rule


def _nll_np(logp, y):
    return -np.mean(np.take_along_axis(logp, y[..., None], axis=-1))


def _nll_decompose(emit, inputs, attrs):
    logp, y = inputs
    picked = emit("sum", emit("mul", logp, emit("one_hot", y, depth=logp.shape[-1],
                                                dtype=logp.dtype.value)), axis=logp.type.ndim - 1)
    return emit("neg", emit("mean", picked))


composite("nll", 2, *_class_loss_rule("nll", "log-probabilities"), _nll_np, _nll_decompose,
          doc="negative log-likelihood of integer labels under log-probabilities")
composite("cross_entropy", 2, *_class_loss_rule("cross_entropy", "logits"),
          lambda z, y: _nll_np(np_log_softmax(z, -1), y),
          lambda emit, inputs, attrs: _nll_decompose(
              emit, [log_softmax_decompose(emit, inputs[:1], {"axis": inputs[0].type.ndim - 1}),
                     inputs[1]], {}),
          doc="cross-entropy of integer labels under logits (log_softmax + nll)")


def _bce_np(z, t):
    return np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))


def _bce_decompose(emit, inputs, attrs):
    z, t = inputs
    zero = emit.const(0.0, z.dtype)
    soft = emit("log1p", emit("exp", emit("neg", emit("abs", z))))
    return emit("mean", emit("add", emit("sub", emit("maximum", z, zero), emit("mul", z, t)), soft))


composite("binary_cross_entropy_with_logits", 2,
          _target_dtype("binary_cross_entropy_with_logits"),
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
    composite(name, (1, None), lambda ops, a: float_dtype(name, ops), scalar_shape,
              lambda *xs: sum(np.sum(np_term(x)) for x in xs), decompose, doc=doc)


_norm_composite("l2", np.square, lambda emit, x: emit("mul", x, x),
                "sum of squares of every element (squared Frobenius norm)")
_norm_composite("l1", np.abs, lambda emit, x: emit("abs", x), "sum of absolute values")


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


composite("dropout", 1, lambda ops, a: float_dtype("dropout", ops), lambda ops, a: same_shape(ops),
          _dropout_np, _dropout_decompose,
          {"p": Attr("float", 0.5), "stream": Attr("int", 0), "train": Attr("bool", False)},
          "inverted dropout with probability p in training (masks hashed from the step's key "
          "and the op's stream); the identity in evaluation")
