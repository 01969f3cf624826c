"""Shape and dtype rule helpers shared by the op declarations (broadcasting, axes, matmul)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from graphc.ir.ops import Operand, TypeError_
from graphc.ir.types import DType, Shape, dim_factors, format_shape


def _axis_name(axis_from_end: int, ndim: int) -> str:
    if axis_from_end == 1:
        return "the last axis"
    return f"axis {ndim - axis_from_end}"


def broadcast(op: str, operands: Sequence[Operand]) -> Shape:
    """numpy broadcasting over symbolic dims: equal dims, or one of them is 1."""
    ndim = max(o.type.ndim for o in operands)
    out: list = []
    for k in range(1, ndim + 1):
        dim = 1
        for o in operands:
            if k > o.type.ndim:
                continue
            d = o.type.shape[-k]
            if d == 1 or d == dim:
                continue
            if dim == 1:
                dim = d
                continue
            listing = ", ".join(str(x) for x in operands)
            raise TypeError_(f"{op}: shapes do not broadcast: {listing} "
                             f"({dim} != {d} on {_axis_name(k, ndim)})")
        out.append(dim)
    return tuple(reversed(out))


def same_dtype(op: str, operands: Sequence[Operand]) -> DType:
    first = operands[0].type.dtype
    for o in operands[1:]:
        if o.type.dtype != first:
            listing = ", ".join(str(x) for x in operands)
            raise TypeError_(f"{op}: dtypes differ: {listing}",
                             hint=f"convert one side with cast(..., {first})")
    return first


def float_dtype(op: str, operands: Sequence[Operand]) -> DType:
    dtype = same_dtype(op, operands)
    if not dtype.is_float:
        raise TypeError_(f"{op}: needs floating-point operands: {operands[0]}",
                         hint=f"convert it with cast({operands[0].label}, f32)")
    return dtype


def normalize_axis(op: str, operand: Operand, axis: int, attr: str = "axis") -> int:
    ndim = operand.type.ndim
    if not -ndim <= axis < max(ndim, 1):
        raise TypeError_(f"{op}: axis {axis} is out of range for {operand.label} "
                         f"({operand.type}, {ndim} ax{'i' if ndim == 1 else 'e'}s)", attr=attr)
    return axis % ndim if ndim else 0


def normalize_axes(op: str, operand: Operand, axis) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(operand.type.ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    out = tuple(sorted({normalize_axis(op, operand, a) for a in axes}))
    if len(out) != len(axes):
        raise TypeError_(f"{op}: repeated axis in {list(axes)}", attr="axis")
    return out


def reduced_shape(shape: Shape, axes: tuple[int, ...], keepdims: bool) -> Shape:
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def matmul_shape(a: Operand, b: Operand) -> Shape:
    sa, sb = a.type.shape, b.type.shape
    if not sa or not sb:
        raise TypeError_(f"matmul: operands must have at least one axis: {a}, {b}",
                         hint="use * to multiply by a scalar")
    ka = sa[-1]
    kb = sb[0] if len(sb) == 1 else sb[-2]
    if ka != kb:
        hint = None
        if len(sb) == 2 and sb[-1] == ka:
            hint = f"did you mean {a.label} @ {_transposed(b.label)}?"
        elif len(sa) == 2 and len(sb) >= 2 and sa[0] == kb:
            hint = f"did you mean {_transposed(a.label)} @ {b.label}?"
        raise TypeError_(f"matmul: inner dimensions differ: {a}, {b} ({ka} != {kb})", hint=hint)
    if len(sa) == 1 and len(sb) == 1:
        return ()
    if len(sa) == 1:
        return tuple(sb[:-2]) + (sb[-1],)
    if len(sb) == 1:
        return tuple(sa[:-1])
    batch_a = Operand(a.type.with_shape(sa[:-2]), a.label)
    batch_b = Operand(b.type.with_shape(sb[:-2]), b.label)
    batch = broadcast("matmul", [batch_a, batch_b]) if (sa[:-2] or sb[:-2]) else ()
    return tuple(batch) + (sa[-2], sb[-1])


def _transposed(label: str) -> str:
    """`transpose(W)` for `W`, and `W` for `transpose(W)`."""
    inner = label[len("transpose("):-1] if label.startswith("transpose(") and label.endswith(")") \
        else None
    if inner is not None and inner.count("(") == inner.count(")") and "," not in inner:
        return inner
    return f"transpose({label})"


def reshape_shape(x: Operand, target: Sequence) -> Shape:
    """Reshape with -1 and symbolic dims: a symbolic factor must carry over as a whole."""
    src = x.type.shape
    src_syms: list[str] = []
    src_const = 1
    for d in src:
        coef, syms = dim_factors(d)
        src_const *= coef
        src_syms += syms
    if list(target).count(-1) > 1:
        raise TypeError_(f"reshape: at most one -1 in the target shape "
                         f"{format_shape(tuple(target))}", attr="shape")
    tgt_syms = [d for d in target if isinstance(d, str)]
    tgt_const = 1
    for d in target:
        if isinstance(d, int) and d != -1:
            if d < 0:
                raise TypeError_(f"reshape: negative size {d} in {format_shape(tuple(target))}",
                                 attr="shape")
            tgt_const *= d
    fail = TypeError_(f"reshape: cannot reshape {x.described()} into {format_shape(tuple(target))}",
                      attr="shape")
    if -1 in target:
        missing_syms = list(src_syms)
        for s in tgt_syms:
            if s not in missing_syms:
                raise fail
            missing_syms.remove(s)
        if tgt_const == 0 or src_const % tgt_const:
            raise fail
        fill_const = src_const // tgt_const
        if missing_syms:
            if len(missing_syms) > 1 or fill_const != 1:
                product = "*".join([str(fill_const)] * (fill_const != 1) + missing_syms)
                raise TypeError_(fail.message, attr="shape",
                                 hint=f"-1 would be {product}: a size is a number or one symbolic "
                                      f"dimension; keep {missing_syms[0]} on its own axis")
            fill = missing_syms[0]
        else:
            fill = fill_const
        return tuple(fill if d == -1 else d for d in target)
    tgt_factors = [dim_factors(d) for d in target if isinstance(d, str)]
    tgt_syms = [s for _, syms in tgt_factors for s in syms]
    tgt_const *= math.prod(coef for coef, _ in tgt_factors)
    if sorted(src_syms) != sorted(tgt_syms) or src_const != tgt_const:
        raise fail
    return tuple(target)
