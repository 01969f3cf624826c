"""The calls the numpy backend makes for each op: the op table's numpy reference, or for the hot
ops of a training step the same numpy function called directly, or an equal computation that is
faster on the small arrays of a step."""
from __future__ import annotations

import operator
from collections.abc import Callable
from functools import partial

import numpy as np

from graphc.ir import OPS
from graphc.ir.node import Node

# The numpy functions behind the op table's references to the hot ops of a step (`OpDef.ufunc`),
# called directly: the table wraps them in a lambda or a helper, one Python call more, which is a
# noticeable part of an op on the small arrays of a training step. The results are the same
# (tests/test_numpy_fast.py).
UFUNCS = {name: op.ufunc for name, op in OPS.items()
          if op.ufunc is not None and op.kind != "reduction"}
REDUCES = {name: op.ufunc.reduce for name, op in OPS.items()
           if op.ufunc is not None and op.kind == "reduction"}
# The numpy backend's lowering table is the op table's numpy references (the calls here make some
# of them faster); it declines no primitive (tests/test_lowering_tables.py).
UNSUPPORTED: frozenset[str] = frozenset()

# Single numbers (Adam's bias corrections, the loss) are numpy scalars, not 0-d arrays: their
# arithmetic then runs in numpy's scalar math, much cheaper than a ufunc call, with the same IEEE
# operation in the same precision. Only f32 and f64: f16 and the integers go through ufuncs.
SCALAR_OPERATORS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
                    "div": operator.truediv, "neg": operator.neg}
_SCALAR_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float64)})

_TRANSPOSED = operator.attrgetter("T")     # a matrix's transpose view, cheaper than .transpose(axes)


def frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False       # shared by every run: an accidental write must fail
    return array


def scalar_nodes(order: list[Node], inputs: list[tuple[int, ...]], shapes: list[tuple],
                 steps: list[int], loads: list[int]) -> set[int]:
    """The steps and loads whose value is kept as a numpy scalar: single f32 or f64 numbers
    that ufuncs and full reductions compute (or that are loaded), read only by such steps and by
    update groups (which take numpy scalars as they take 0-d arrays). `steps`: every computed
    node, in order."""
    def scalar_op(i: int) -> bool:
        return order[i].op in UFUNCS or order[i].op in REDUCES or order[i].op == "cast"

    read_ok = {i: True for i in (*steps, *loads)}
    for i in steps:
        for j in inputs[i]:
            if j in read_ok and not scalar_op(i):
                read_ok[j] = False
    return {i for i, ok in read_ok.items() if ok and shapes[i] == ()
            and order[i].dtype.numpy in _SCALAR_DTYPES and (i in loads or scalar_op(i))}


def fast_call(node: Node, ins: tuple[int, ...], kwargs: dict, shapes: list[tuple], shape: tuple,
              template: list, output: bool, scalar: bool = False
              ) -> tuple[Callable, tuple[int, ...], dict, bool]:
    """How a step calls its op: (fn, operand slots, keyword attributes, whether fn takes `out`).
    The op table's reference, or for the hot ops of a training step the numpy function inside
    it, or a faster equal computation. `shapes`: every slot's; `shape`: the result's. Constants
    a call needs of its own (relu's 0, numpy scalars of 0-d constants) are appended to
    `template`. A `scalar` step (scalar_nodes) returns a numpy scalar."""
    op = OPS[node.op]
    if scalar:
        return _scalar_call(node, ins, kwargs, template)
    if node.op in UFUNCS and not kwargs:
        return UFUNCS[node.op], ins, kwargs, True
    if node.op in REDUCES:
        return REDUCES[node.op], ins, kwargs, True
    if node.op == "relu" and node.dtype.is_float:
        template.append(frozen(np.zeros((), node.dtype.numpy)))
        return np.maximum, (ins[0], len(template) - 1), {}, True
    if node.op == "transpose" and kwargs["axes"] in ((1, 0), [1, 0]):
        return _TRANSPOSED, ins, {}, False
    if node.op == "transpose":
        return operator.methodcaller("transpose", kwargs["axes"]), ins, {}, False
    if node.op == "one_hot" and not output:
        rows = frozen(np.eye(kwargs["depth"], dtype=node.dtype.numpy))
        unsigned = np.dtype(f"u{node.inputs[0].dtype.numpy.itemsize}")
        return partial(_one_hot, rows, unsigned, op.numpy, kwargs), ins, {}, True
    if node.op == "where" and not output and _selects_zero(node, ins, shapes, shape, template):
        bits = np.dtype(f"u{node.dtype.numpy.itemsize}")
        return partial(_select_or_zero, bits=bits), ins[:2], {}, True
    return op.numpy, ins, kwargs, op.numpy_out


def _one_hot(rows: np.ndarray, unsigned: np.dtype, reference: Callable, kwargs: dict,
             y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """one_hot as rows of the identity picked by label, the range checked in one pass (labels
    seen `unsigned`: a negative one is huge). A label out of range goes to the reference, which
    says which."""
    y = np.asarray(y)
    if y.size and np.maximum.reduce(y.view(unsigned), None) >= len(rows):
        return reference(y, **kwargs, out=out)
    return rows.take(y, 0, out, "clip")     # all in range: "clip" only skips take's own copy


def _selects_zero(node: Node, ins: tuple[int, ...], shapes: list[tuple], shape: tuple,
                  template: list) -> bool:
    """Is `where(c, a, b)` a float `a` or +0.0 (relu's and dropout's gradients), with c and a of
    the result's shape? Then it is a bit mask (_select_or_zero)."""
    c, a, b = ins
    zero = template[b]
    dtype = node.dtype.numpy
    return (dtype.kind == "f" and zero is not None and zero.shape == () and zero.dtype == dtype
           and zero.view(f"u{dtype.itemsize}") == 0 and template[a] is None
           and template[c] is None and shapes[c] == shapes[a] == shape)


def _select_or_zero(c: np.ndarray, a: np.ndarray, out: np.ndarray, bits: np.dtype) -> np.ndarray:
    """`a where c else +0.0`, bit for bit as np.where gives it (NaN, -0.0 kept), branch free in
    one pass: a's bits times c (True 1, False 0) as unsigned integers are a's bits or +0.0's."""
    np.multiply(np.asarray(a).view(bits), c, out=out.view(bits))
    return out


def _scalar_call(node: Node, ins: tuple[int, ...], kwargs: dict,
                 template: list) -> tuple[Callable, tuple[int, ...], dict, bool]:
    """A scalar step: Python's operator on numpy scalars, or the ufunc, reduction or cast
    without `out`, which returns a numpy scalar. 0-d constants are read as numpy scalars."""
    operands = []
    for j in ins:
        if template[j] is not None and template[j].shape == ():
            template.append(template[j][()])
            j = len(template) - 1
        operands.append(j)
    same = all(node.inputs[k].dtype == node.dtype for k in range(len(ins)))
    if node.op in SCALAR_OPERATORS and same:
        return SCALAR_OPERATORS[node.op], tuple(operands), {}, False
    if node.op in REDUCES:
        return REDUCES[node.op], tuple(operands), kwargs, False
    if node.op == "cast":            # the scalar type's constructor: numpy's cast, as astype
        return node.dtype.numpy.type, tuple(operands), {}, False
    return UFUNCS[node.op], tuple(operands), kwargs, False
