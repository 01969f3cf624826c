"""Algebraic simplification: local rewrites found in the lowered train steps (neutral elements,
double negation, broadcasts an elementwise op does itself, layout chains, scalar factor chains,
mean as sum / count), and `log(softmax)` -> `log_softmax` before decomposition.

Each rule maps one node to an equal computation over its (already simplified) inputs, keeping
its name, location and tags. Rules are exact unless their comment says otherwise; the list of
inexact ones, with their error bounds, is in docs/architecture.md ("Passes").
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from graphc.ir import ops as op_table
from graphc.ir.node import Graph, Node
from graphc.ir.ops import Operand, TypeError_
from graphc.ir.shapes import broadcast, normalize_axes
from graphc.passes.fold import folded, make_const, splat_value
from graphc.passes.rewrite import rewrite

Rule = Callable[["Simplifier", Node], "Node | None"]
_MAX_REWRITES = 32      # per node; every rule makes the graph smaller or cheaper, so far fewer run


class Simplifier:
    def __init__(self, graph: Graph, differentiated: bool = False):
        # A graph that holds its gradients is differentiated no more: rewrites autodiff could not
        # follow (`size` of a live value) are allowed there.
        self.final = differentiated
        # How many times each node of the graph is read (outputs included), carried over to the
        # node that replaces it, so that a rule can tell whether an operand it rebuilds is
        # shared; a node a rule makes is read by that rule's result only.
        nodes = graph.nodes()
        self._reads = {id(n): 0 for n in nodes}
        for n in nodes:
            for i in n.inputs:
                self._reads[id(i)] += 1
        for _, n in graph.outputs:
            self._reads[id(n)] += 1
        self.reads: dict[int, int] = {}

    def visit(self, node: Node, inputs: list[Node]) -> Node:
        new = self.simplify(op_table.rebuilt(node, inputs))
        self.reads[id(new)] = self.reads.get(id(new), 0) + self._reads[id(node)]
        return new

    def shared(self, node: Node) -> bool:
        return self.reads.get(id(node), 1) > 1

    def simplify(self, node: Node) -> Node:
        for _ in range(_MAX_REWRITES):
            new = folded(node) or self._rewrite_once(node)
            if new is None:
                break
            assert new.type == node.type, (f"internal error: simplifying {node} gave {new.type}")
            node = new
        return node

    def _rewrite_once(self, node: Node) -> Node | None:
        for rule in RULES.get(node.op, ()) + (_GENERIC if _broadcasting(node) else ()):
            try:
                new = rule(self, node)
            except TypeError_:      # the rewritten operands do not type-check: not this rule
                continue
            if new is not None and new is not node:
                return new
        return None

    def emit(self, like: Node, op: str, *inputs: Node, **attrs) -> Node:
        """A helper node of a rewrite (like's location and tags, no name), itself simplified."""
        return self.simplify(op_table.apply(op, inputs, attrs, loc=like.loc, tags=like.tags))

    def replace(self, like: Node, op: str, *inputs: Node, **attrs) -> Node | None:
        """The node that takes `like`'s place: its name, location and tags, and its type, or None
        when the operands give another type."""
        new = op_table.apply(op, inputs, attrs, loc=like.loc, name=like.name, tags=like.tags)
        return new if new.type == like.type else None

    def scalar(self, like: Node, value) -> Node:
        """A scalar constant of like's dtype (its location and tags)."""
        c = op_table.source("const", like.type.with_shape(()), loc=like.loc, value=value)
        return c.relabeled(tags=like.tags)

    def const(self, like: Node, value) -> Node:
        """`value` in every element of a node that takes like's place."""
        if like.shape == ():
            return make_const(value, like)
        return self.replace(like, "broadcast_to", self.scalar(like, value), shape=like.shape)


def simplify(graph: Graph) -> Graph:
    """The rules, on a graph that may still be differentiated (the pipeline's first stage)."""
    return rewrite(graph, Simplifier(graph).visit)


def simplify_derived(graph: Graph) -> Graph:
    """The rules, on a graph that holds its gradients (after autodiff): a symbolic mean, too,
    becomes sum / size."""
    return rewrite(graph, Simplifier(graph, differentiated=True).visit)


# --- predicates -----------------------------------------------------------------------------------

def _ones(shape) -> bool:
    return all(d == 1 for d in shape)


def _scalarish(n: Node) -> bool:
    """One element: a scalar, or a tensor whose axes all have size 1."""
    return _ones(n.shape)


def _strip_ones(shape) -> tuple:
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def _is(n: Node, value) -> bool:
    """Is every element of `n` the number `value` (a constant, possibly broadcast)?"""
    v = splat_value(n)
    return v is not None and not isinstance(v, bool) and _numeric(n) and v == value


def _numeric(n: Node) -> bool:
    return n.dtype.is_float or n.dtype.is_int


def _broadcasting(n: Node) -> bool:
    """An elementwise op whose result has the broadcast shape of its operands (not one_hot)."""
    if op_table.OPS[n.op].kind != "elementwise" or not n.inputs:
        return False
    try:
        return broadcast(n.op, [Operand(i.type, "") for i in n.inputs]) == n.shape
    except TypeError_:
        return False


def _big_times_scalar(n: Node) -> tuple[Node, Node] | None:
    """(X, s) when n is X * s or s * X, s a single element only broadcast onto X (n's type)."""
    if n.op != "mul" or _scalarish(n):
        return None
    a, b = n.inputs
    if _scalarish(b) and a.type == n.type:
        return a, b
    if _scalarish(a) and b.type == n.type:
        return b, a
    return None


def _factor(n: Node) -> tuple[Node, Node, str] | None:
    """(X, s, "mul" | "div") when n is X * s, s * X or X / s with a single-element s."""
    if n.op == "div" and not _scalarish(n):
        x, s = n.inputs
        return (x, s, "div") if _scalarish(s) and x.type == n.type else None
    pair = _big_times_scalar(n)
    return (pair[0], pair[1], "mul") if pair else None


def _broadcast_source(n: Node) -> Node | None:
    """What `n` broadcasts, when it is broadcast_to(x) or a reshape that only adds or removes
    leading axes of size 1 (numpy's broadcasting does both for an elementwise op)."""
    if n.op == "broadcast_to":
        return n.inputs[0]
    if n.op == "reshape" and _strip_ones(n.shape) == _strip_ones(n.inputs[0].shape):
        return n.inputs[0]
    return None


# --- rules ----------------------------------------------------------------------------------------

def _add(s: Simplifier, n: Node) -> Node | None:
    a, b = n.inputs
    if _numeric(n):
        if _is(b, 0) and a.type == n.type:
            return a            # x + 0: exact but for x = -0.0 (gives -0.0, not +0.0)
        if _is(a, 0) and b.type == n.type:
            return b
    if a.op == "neg":
        return s.replace(n, "sub", b, a.inputs[0])      # -x + y = y - x
    if b.op == "neg":
        return s.replace(n, "sub", a, b.inputs[0])      # x + -y = x - y
    if a == b and n.dtype.is_float:
        return s.replace(n, "mul", a, s.scalar(n, 2.0))    # x + x = 2 * x, exactly
    if a.op == "add" and a.type == n.type and n.dtype.is_float and not s.shared(a):
        # (x + y) + y -> x + 2 * y: the walk accumulates the two halves of d(y * y) one by one
        # (the l2 term). Reassociated, so not exact: within an ulp of |x| + 2|y|.
        for x, y in (a.inputs, a.inputs[::-1]):
            if y == b and x.type == n.type:
                return s.replace(n, "add", x, s.emit(b, "mul", b, s.scalar(b, 2.0)))
    return None


def _sub(s: Simplifier, n: Node) -> Node | None:
    a, b = n.inputs
    if _numeric(n):
        if _is(b, 0) and a.type == n.type:
            return a
        if _is(a, 0) and b.type == n.type:
            return s.replace(n, "neg", b)   # 0 - x = -x: exact but for the sign of a zero result
    if b.op == "neg":
        return s.replace(n, "add", a, b.inputs[0])
    if a == b and n.dtype.is_int:
        # Integers only: for floats x - x is nan where x is inf or nan, and a diverged run must
        # show its nan, so it stays.
        return s.const(n, 0)
    return None


def _mul(s: Simplifier, n: Node) -> Node | None:
    a, b = n.inputs
    for x, c in ((a, b), (b, a)):
        if not _numeric(n) or x.type != n.type:
            continue
        if _is(c, 1):
            return x
        if _is(c, -1):
            return s.replace(n, "neg", x)
        if _is(c, 0) and n.dtype.is_int:
            return s.const(n, 0)    # floats keep x * 0: it is nan where x is inf or nan
    return _merge_factors(s, n)


def _div(s: Simplifier, n: Node) -> Node | None:
    a, b = n.inputs
    if a.type == n.type:
        if _is(b, 1):
            return a
        if _is(b, -1):
            return s.replace(n, "neg", a)
        inverse = _exact_inverse(splat_value(b), n)
        if _scalarish(b) and inverse is not None:
            # x / 2^k == x * 2^-k exactly (both are the correctly rounded x * 2^-k).
            return s.replace(n, "mul", a, s.scalar(n, inverse))
    return _merge_factors(s, n)


def _exact_inverse(v, like: Node) -> float | None:
    """1 / v when v is a power of two whose inverse like's dtype holds exactly, else None."""
    if not like.dtype.is_float or like.dtype.value == "bf16" or not isinstance(v, (int, float)) \
            or isinstance(v, bool) or v == 0 or not math.isfinite(v):
        return None
    mantissa, _ = math.frexp(abs(v))
    if mantissa != 0.5:
        return None
    inverse = 1.0 / v
    held = np.asarray(inverse, dtype=like.dtype.numpy).item()
    return inverse if held == inverse else None


def _merge_factors(s: Simplifier, n: Node) -> Node | None:
    """Scalar factor chains: (X * a) * b -> X * (a * b), and likewise with / on either side, so
    the large X is touched once and the factors multiply as scalars. Not exact: the factors are
    rounded once more (|relative error| <= 2 ulp, 2.4e-7 in f32)."""
    outer = _factor(n)
    if outer is None:
        return None
    e, f2, k2 = outer
    inner = _factor(e)
    if inner is None:
        return None
    x, f1, k1 = inner
    if k1 == "mul" and k2 == "mul":
        return s.replace(n, "mul", x, s.emit(n, "mul", f1, f2))
    if k1 == "div" and k2 == "div":
        return s.replace(n, "div", x, s.emit(n, "mul", f1, f2))
    if k1 == "mul":                                  # X * a / b = X * (a / b)
        return s.replace(n, "mul", x, s.emit(n, "div", f1, f2))
    return s.replace(n, "mul", x, s.emit(n, "div", f2, f1))      # X / a * b = X * (b / a)


def _neg(s: Simplifier, n: Node) -> Node | None:
    (x,) = n.inputs
    if x.op == "neg":
        return x.inputs[0]
    if x.op == "sub":                                # -(a - b) = b - a (but for a zero's sign)
        return s.replace(n, "sub", x.inputs[1], x.inputs[0])
    # -(X * c) = X * (-c) and -(X / c) = X / (-c): the sign moves onto the scalar, exactly.
    f = _factor(x)
    if f is not None:
        big, c, kind = f
        return s.replace(n, kind, big, s.emit(n, "neg", c))
    return None


def _exp(s: Simplifier, n: Node) -> Node | None:
    # exp(log(x)) = x for x >= 0 (for x < 0 the original is nan); not exact: the round trip of
    # the original rounds twice (a few ulp).
    (x,) = n.inputs
    return x.inputs[0] if x.op == "log" else None


def _log(s: Simplifier, n: Node) -> Node | None:
    # log(exp(x)) = x: exact in real numbers, and better where exp overflows (inf there before).
    (x,) = n.inputs
    return x.inputs[0] if x.op == "exp" else None


def _same_operands(s: Simplifier, n: Node) -> Node | None:
    """max(x, x), min(x, x) and where(c, x, x) are x."""
    a, b = n.inputs[-2:]
    return a if a == b and a.type == n.type else None


def _pow(s: Simplifier, n: Node) -> Node | None:
    a, b = n.inputs
    return a if _is(b, 1) and a.type == n.type else None


def _idempotent(s: Simplifier, n: Node) -> Node | None:
    """relu(relu(x)) and abs(abs(x))."""
    (x,) = n.inputs
    return x if x.op == n.op else None


def _cast(s: Simplifier, n: Node) -> Node | None:
    (x,) = n.inputs
    return x if x.dtype == n.dtype else None


def _reshape(s: Simplifier, n: Node) -> Node | None:
    (x,) = n.inputs
    if x.shape == n.shape:
        return x
    if x.op == "reshape":
        return s.replace(n, "reshape", x.inputs[0], shape=n.shape)
    if x.op == "broadcast_to" and _scalarish(x.inputs[0]) and x.inputs[0].type.ndim <= n.type.ndim:
        return s.replace(n, "broadcast_to", x.inputs[0], shape=n.shape)   # a splat, reshaped
    if x.op == "sum" and x.attr["keepdims"] and not s.shared(x):
        # sum_to's sum(g, axes, keepdims=True) then reshape dropping those axes: one sum.
        flat = s.emit(n, "sum", x.inputs[0], axis=x.attr["axis"], keepdims=False)
        return s.replace(n, "reshape", flat, shape=n.shape)
    return None


def _broadcast_to(s: Simplifier, n: Node) -> Node | None:
    (x,) = n.inputs
    if x.shape == n.shape:
        return x
    inner = _broadcast_source(x)
    if inner is not None:
        return s.replace(n, "broadcast_to", inner, shape=n.shape)
    return None


def _transpose_perm(n: Node) -> tuple[int, ...]:
    ndim = n.inputs[0].type.ndim
    axes = n.attr["axes"]
    return tuple(reversed(range(ndim))) if axes is None else tuple(a % ndim for a in axes)


def _transpose(s: Simplifier, n: Node) -> Node | None:
    (x,) = n.inputs
    perm = _transpose_perm(n)
    if perm == tuple(range(len(perm))):
        return x
    if x.op == "transpose":
        inner = _transpose_perm(x)
        composed = tuple(inner[p] for p in perm)
        if composed == tuple(range(len(composed))):
            return x.inputs[0]
        return s.replace(n, "transpose", x.inputs[0], axes=composed)
    return None


def _sum(s: Simplifier, n: Node) -> Node | None:
    """sum(one_hot(y) * c, axis=depth) = c for a single-element c (the loss gradient's 1/N): a
    one-hot row is one 1 and zeros (a label out of range is an error on every backend), and
    c + (+-0) is c. Exact for finite c; for c inf or nan the original is nan (0 * inf)."""
    (x,) = n.inputs
    pair = _big_times_scalar(x)
    if pair is None or pair[0].op != "one_hot" or not n.dtype.is_float:
        return None
    c = pair[1]
    if normalize_axes("sum", Operand(x.type, ""), n.attr["axis"]) != (x.type.ndim - 1,):
        return None
    return c if c.type == n.type else s.replace(n, "broadcast_to", c, shape=n.shape)


def _mean(s: Simplifier, n: Node) -> Node | None:
    """mean -> sum / count, so backends have one reduction less. Exact: np.mean is that sum
    divided by the count (in f64, then rounded, which for one division is the same). Only f32 and
    f64 (np.mean sums f16 in f32) and counts a float holds exactly. A symbolic count is `size`,
    which has no gradient rule: only in graphs that are differentiated already."""
    (x,) = n.inputs
    if n.dtype.value not in ("f32", "f64"):
        return None
    axes = normalize_axes("mean", Operand(x.type, ""), n.attr["axis"])
    dims = [x.shape[a] for a in axes]
    if all(isinstance(d, int) for d in dims):
        count = math.prod(dims)
        if count == 0 or count > 2 ** 24:
            return None
        divisor = s.scalar(n, float(count))
    elif s.final:
        divisor = s.emit(n, "size", x, axis=n.attr["axis"], dtype=n.dtype.value)
    else:
        return None
    total = s.emit(n, "sum", x, axis=n.attr["axis"], keepdims=n.attr["keepdims"])
    return s.replace(n, "div", total, divisor)


# --- rules for every broadcasting elementwise op ----------------------------------------------------

def _drop_broadcast_operand(s: Simplifier, n: Node) -> Node | None:
    """op(broadcast_to(a, S), b) -> op(a, b) when the result keeps its shape: the op broadcasts."""
    for i, x in enumerate(n.inputs):
        inner = _broadcast_source(x)
        if inner is None:
            continue
        inputs = list(n.inputs)
        inputs[i] = inner
        try:
            new = s.replace(n, n.op, *inputs, **n.attr)
        except TypeError_:
            continue
        if new is not None:
            return new
    return None


def _sink_broadcast(s: Simplifier, n: Node) -> Node | None:
    """op(broadcast_to(a, S), c) -> broadcast_to(op(a, c), S) for single-element c: the op runs
    on a's elements only (gradient seeds are broadcast scalars)."""
    if _scalarish(n) or not any(i.op == "broadcast_to" for i in n.inputs):
        return None
    inner_inputs = []
    for x in n.inputs:
        if x.op == "broadcast_to":
            inner_inputs.append(x.inputs[0])
        elif _scalarish(x):
            inner_inputs.append(x)
        else:
            return None
    inner = s.emit(n, n.op, *inner_inputs, **n.attr)
    if inner.shape == n.shape:
        return None
    return s.replace(n, "broadcast_to", inner, shape=n.shape)


_GENERIC: tuple[Rule, ...] = (_drop_broadcast_operand, _sink_broadcast)

RULES: dict[str, tuple[Rule, ...]] = {
    "add": (_add,), "sub": (_sub,), "mul": (_mul,), "div": (_div,), "neg": (_neg,),
    "exp": (_exp,), "log": (_log,), "pow": (_pow,),
    "maximum": (_same_operands,), "minimum": (_same_operands,), "where": (_same_operands,),
    "relu": (_idempotent,), "abs": (_idempotent,), "cast": (_cast,),
    "reshape": (_reshape,), "broadcast_to": (_broadcast_to,), "transpose": (_transpose,),
    "sum": (_sum,), "mean": (_mean,),
}


# --- composites ---------------------------------------------------------------------------------

def simplify_composites(graph: Graph) -> Graph:
    """Rewrites best made before decomposition: log(softmax(x)) -> log_softmax(x), which never
    takes the log of an underflowed 0 (-inf there before) and saves an exp and a division."""
    def visit(node: Node, inputs: list[Node]) -> Node:
        node = op_table.rebuilt(node, inputs)
        if node.op == "log" and inputs[0].op == "softmax":
            x = inputs[0]
            return op_table.apply("log_softmax", x.inputs, x.attr, loc=node.loc, name=node.name,
                                  tags=node.tags)
        return node
    return rewrite(graph, visit)
