"""Composite ops of sequence models: scaled dot-product attention, causal or not, with dropout on
its weights; it decomposes into matmul, transpose, mul, causal_mask, softmax's primitives and
dropout's."""
from __future__ import annotations

import math

import numpy as np

from graphc.ir import ops as op_table
from graphc.ir.composites import _softmax_decompose, composite, np_log_softmax
from graphc.ir.composites_losses import _dropout_decompose, _dropout_np
from graphc.ir.ops import Attr, TypeError_
from graphc.ir.shapes import float_dtype, matmul_shape
from graphc.ir.types import TensorType


def _attention_dtype(ops, attrs):
    return float_dtype("attention", ops)


def _attention_shape(ops, attrs):
    q, k, v = ops
    for x in ops:
        if x.type.ndim < 2:
            raise TypeError_(f"attention: q, k and v must be [..., T, D] (at least two axes): {x}")
    if q.type.shape[-1] != k.type.shape[-1]:
        raise TypeError_(f"attention: queries and keys must have the same width: {q}, {k} "
                         f"({q.type.shape[-1]} != {k.type.shape[-1]})")
    if k.type.shape[-2] != v.type.shape[-2]:
        raise TypeError_(f"attention: keys and values must have the same length: {k}, {v} "
                         f"({k.type.shape[-2]} != {v.type.shape[-2]})")
    if attrs["causal"] and q.type.shape[-2] != k.type.shape[-2]:
        raise TypeError_(f"attention: a causal mask needs as many queries as keys: {q}, {k}")
    p = attrs["dropout"]
    if not 0.0 <= p < 1.0:
        raise TypeError_(f"attention: dropout must be in [0, 1), got {p}", attr="dropout")
    scores = matmul_shape(q, op_table.Operand(TensorType(k.type.dtype, _swapped(k.type.shape)), k.label))
    return matmul_shape(op_table.Operand(TensorType(q.type.dtype, scores), "weights"), v)


def _swapped(shape: tuple) -> tuple:
    return tuple(shape[:-2]) + (shape[-1], shape[-2])


def _attention_np(q, k, v, causal=True, dropout=0.0, stream=0, train=False, key=None):
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    if causal:
        s = op_table.OPS["causal_mask"].numpy(s, value=float("-inf"))
    w = np.exp(np_log_softmax(s, -1))
    w = _dropout_np(w, dropout, stream, train, key)
    return np.matmul(w, v)


def _attention_decompose(emit, inputs, attrs):
    q, k, v = inputs
    axes = tuple(range(k.type.ndim - 2)) + (k.type.ndim - 1, k.type.ndim - 2)
    scores = emit("mul", emit("matmul", q, emit("transpose", k, axes=axes)),
                  emit.const(1.0 / math.sqrt(q.shape[-1]), q.dtype))
    if attrs["causal"]:
        scores = emit("causal_mask", scores, value=float("-inf"))
    weights = _softmax_decompose(emit, [scores], {"axis": scores.type.ndim - 1})
    weights = _dropout_decompose(emit, [weights], {"p": attrs["dropout"], "stream": attrs["stream"],
                                                   "train": attrs["train"]})
    return emit("matmul", weights, v)


composite("attention", 3, _attention_dtype, _attention_shape, _attention_np, _attention_decompose,
          {"causal": Attr("bool", True), "dropout": Attr("float", 0.0), "stream": Attr("int", 0),
           "train": Attr("bool", False)},
          "softmax(q @ k^T / sqrt(D), masked causally) @ v, with dropout on the weights in training")
