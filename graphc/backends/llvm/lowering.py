"""How each primitive op becomes LLVM IR: one entry per op name, the table the LLVM renderer reads.

Every entry takes the function being written (`f`), the operands' IR values and dtypes, the op's
attributes and its result dtype, and returns the IR value of the result. An entry that calls the
C math library says which functions (`libm`): the JIT is told where those are (jit.py). The ops
the kernel planner handles itself are in kernels/tables.PLANNED; `UNSUPPORTED` lists the rest this
backend declines.
"""
from __future__ import annotations

import struct

import numpy as np

from graphc.ir.primitives import hash32
from graphc.ir.types import DType

IR_TYPE = {DType.f16: "half", DType.f32: "float", DType.f64: "double", DType.i32: "i32",
           DType.i64: "i64", DType.bool: "i1"}
MEM_TYPE = {**IR_TYPE, DType.bool: "i8"}      # numpy keeps a bool in a byte
SUFFIX = {DType.f16: "f16", DType.f32: "f32", DType.f64: "f64", DType.i32: "i32", DType.i64: "i64"}
LIBM = {DType.f32: "f", DType.f64: "", DType.f16: None}   # expf / exp; half goes through float

# Elementwise float arithmetic may be contracted into FMAs; reductions may also be reassociated
# (vectorized), which changes the order of a sum: both stay within the stated tolerances.
FLAGS = "arcp contract"
REDUCE_FLAGS = "reassoc arcp contract"


def const(value, dtype: DType) -> str:
    """An IR literal of `dtype` (floats in the exact hexadecimal form LLVM wants)."""
    if dtype is DType.bool:
        return "true" if value else "false"
    if dtype.is_int:
        return str(int(value))
    if dtype is DType.f16:
        return f"0xH{int(np.array(value, dtype=np.float16).view(np.uint16)):04X}"
    if dtype is DType.f32:
        value = float(np.float32(value))
    return f"0x{struct.unpack('<Q', struct.pack('<d', float(value)))[0]:016X}"


def _calls(*libm: str):
    """Marks a lowering that calls these C math functions (each in its f32 and f64 forms, expf and
    exp), directly or through an LLVM intrinsic that the code generator may turn into one."""
    def mark(lower):
        lower.libm = libm
        return lower
    return mark


def _float_call(name: str):
    """exp, log, tanh, log1p: LLVM intrinsics where they exist, else the C library."""
    intrinsic = name in ("exp", "log", "sqrt", "fabs")

    @_calls(name)
    def lower(f, args, dts, attrs, out):
        t = IR_TYPE[out]
        if intrinsic:
            fn = f"llvm.{name}.{SUFFIX[out]}"
        elif out is DType.f16:
            x = f.emit(f"fpext half {args[0]} to float")
            return f.emit(f"fptrunc float {f.call(f'{name}f', 'float', [('float', x)])} to half")
        else:
            fn = name + LIBM[out]
        return f.call(fn, t, [(t, args[0])])
    return lower


def _arith(fop: str, iop: str):
    def lower(f, args, dts, attrs, out):
        t = IR_TYPE[out]
        if out.is_float:
            return f.emit(f"{fop} {FLAGS} {t} {args[0]}, {args[1]}")
        return f.emit(f"{iop} {t} {args[0]}, {args[1]}")
    return lower


def _extremum(fname: str, iname: str, bop: str):
    @_calls({"maximum": "fmax", "minimum": "fmin"}[fname])
    def lower(f, args, dts, attrs, out):
        t = IR_TYPE[out]
        if out.is_float:            # maximum/minimum propagate NaN, as numpy does
            return f.call(f"llvm.{fname}.{SUFFIX[out]}", t, [(t, args[0]), (t, args[1])])
        if out is DType.bool:
            return f.emit(f"{bop} i1 {args[0]}, {args[1]}")
        return f.call(f"llvm.{iname}.{SUFFIX[out]}", t, [(t, args[0]), (t, args[1])])
    return lower


def _compare(fcond: str, icond: str):
    def lower(f, args, dts, attrs, out):
        t = IR_TYPE[dts[0]]
        if dts[0].is_float:
            return f.emit(f"fcmp {fcond} {t} {args[0]}, {args[1]}")
        return f.emit(f"icmp {icond} {t} {args[0]}, {args[1]}")
    return lower


def _neg(f, args, dts, attrs, out):
    t = IR_TYPE[out]
    return f.emit(f"fneg {t} {args[0]}") if out.is_float else f.emit(f"sub {t} 0, {args[0]}")


def _abs(f, args, dts, attrs, out):
    t = IR_TYPE[out]
    if out.is_float:
        return f.call(f"llvm.fabs.{SUFFIX[out]}", t, [(t, args[0])])
    return f.call(f"llvm.abs.{SUFFIX[out]}", t, [(t, args[0]), ("i1", "false")])


# exp in f32 as Cephes' expf: n = round(x / ln 2), r = x - n ln 2 in two parts, a degree-5
# polynomial for exp(r) on [-ln 2 / 2, ln 2 / 2], then the scale 2^n applied as two halves of
# the exponent (so results down to the subnormals and up to overflow come out right). Within 1 ulp
# of the correctly rounded value (tests/test_llvm_backend.py sweeps every binade) and vectorizable, where a
# call of expf per element is not (softmax, GELU's gradient, sigmoid). f64 and f16 call the
# C library.
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4


def _exp(f, args, dts, attrs, out):
    if out is not DType.f32:
        return _float_call("exp")(f, args, dts, attrs, out)
    t, x = "float", args[0]
    # clamped to [-104, 89], beyond which expf is 0 and inf (the scale makes both inside it);
    # llvm.minimum/maximum propagate NaN, and the NaN is selected back at the end
    hi = f.call("llvm.minimum.f32", t, [(t, x), (t, const(89.0, out))])
    xc = f.call("llvm.maximum.f32", t, [(t, hi), (t, const(-104.0, out))])
    n = f.call("llvm.rint.f32", t, [(t, f.emit(f"fmul float {xc}, {const(1.4426950408889634, out)}"))])
    r = f.emit(f"fsub float {xc}, {f.emit(f'fmul float {n}, {const(_LN2_HI, out)}')}")
    r = f.emit(f"fsub float {r}, {f.emit(f'fmul float {n}, {const(_LN2_LO, out)}')}")
    acc = const(_EXP_POLY[0], out)
    for c in _EXP_POLY[1:]:
        acc = f.emit(f"fadd {FLAGS} float {f.emit(f'fmul {FLAGS} float {acc}, {r}')}, {const(c, out)}")
    r2 = f.emit(f"fmul {FLAGS} float {r}, {r}")
    p = f.emit(f"fadd {FLAGS} float {f.emit(f'fmul {FLAGS} float {acc}, {r2}')}, {r}")
    p = f.emit(f"fadd {FLAGS} float {p}, {const(1.0, out)}")
    k = f.emit(f"fptosi float {n} to i32")                  # in [-150, 128]
    k1 = f.emit(f"ashr i32 {k}, 1")
    k2 = f.emit(f"sub i32 {k}, {k1}")

    def power(e):       # 2^e for e in [-75, 64], written into a float's exponent field
        biased = f.emit(f"add i32 {e}, 127")
        return f.emit(f"bitcast i32 {f.emit(f'shl i32 {biased}, 23')} to float")
    scaled = f.emit(f"fmul float {p}, {power(k1)}")
    value = f.emit(f"fmul float {scaled}, {power(k2)}")
    nan = f.emit(f"fcmp uno float {x}, 0.0")
    return f.emit(f"select i1 {nan}, float {x}, float {value}")


@_calls("fmax")
def _relu(f, args, dts, attrs, out):
    return _extremum("maximum", "smax", "or")(f, [args[0], const(0, out)], dts, attrs, out)


@_calls("exp")
def _sigmoid(f, args, dts, attrs, out):
    # 1 / (1 + exp(-x)): exp overflows to inf for very negative x, and 1/inf is the right 0.
    t = IR_TYPE[out]
    e = _exp(f, [f.emit(f"fneg {t} {args[0]}")], dts, attrs, out)
    d = f.emit(f"fadd {FLAGS} {t} {const(1, out)}, {e}")
    return f.emit(f"fdiv {FLAGS} {t} {const(1, out)}, {d}")


@_calls("pow")
def _pow(f, args, dts, attrs, out):
    t = IR_TYPE[out]
    return f.call(f"llvm.pow.{SUFFIX[out]}", t, [(t, args[0]), (t, args[1])])


def _where(f, args, dts, attrs, out):
    t = IR_TYPE[out]
    return f.emit(f"select i1 {args[0]}, {t} {args[1]}, {t} {args[2]}")


def cast(f, value: str, src: DType, dst: DType) -> str:
    if src is dst:
        return value
    s, d = IR_TYPE[src], IR_TYPE[dst]
    if dst is DType.bool:
        return (f.emit(f"fcmp une {s} {value}, {const(0, src)}") if src.is_float
                else f.emit(f"icmp ne {s} {value}, 0"))
    if src.is_float and dst.is_float:
        wider = {DType.f16: 16, DType.f32: 32, DType.f64: 64}
        op = "fpext" if wider[dst] > wider[src] else "fptrunc"
        return f.emit(f"{op} {s} {value} to {d}")
    if src.is_float:
        return f.emit(f"fptosi {s} {value} to {d}")
    if dst.is_float:
        return f.emit(f"{'uitofp' if src is DType.bool else 'sitofp'} {s} {value} to {d}")
    bits = {DType.bool: 1, DType.i32: 32, DType.i64: 64}
    if bits[dst] == bits[src]:
        return value
    op = "trunc" if bits[dst] < bits[src] else ("zext" if src is DType.bool else "sext")
    return f.emit(f"{op} {s} {value} to {d}")


def _cast(f, args, dts, attrs, out):
    return cast(f, args[0], dts[0], out)


def _identity(f, args, dts, attrs, out):
    return args[0]


def _hash32(f, x: str) -> str:
    """lowbias32, as graphc.ir.primitives.hash32."""
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = f.emit(f"xor i32 {x}, {f.emit(f'lshr i32 {x}, {shift}')}")
        x = f.emit(f"mul i32 {x}, {mult - (1 << 32) if mult >= 1 << 31 else mult}")
    return f.emit(f"xor i32 {x}, {f.emit(f'lshr i32 {x}, 16')}")


def _i32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _uniform(f, args, dts, attrs, out):
    key, flat = args
    key = cast(f, key, dts[0], DType.i64)
    lo = f.emit(f"trunc i64 {key} to i32")
    hi = f.emit(f"trunc i64 {f.emit(f'lshr i64 {key}, 32')} to i32")
    stream_word = hash32(attrs["stream"] + 0x9E3779B9)       # a constant of the op
    w0 = _hash32(f, f.emit(f"xor i32 {lo}, {_i32(stream_word)}"))
    w1 = _hash32(f, f.emit(f"xor i32 {_hash32(f, f.emit(f'add i32 {hi}, {_i32(0x632BE5AB)}'))}, {w0}"))
    index = f.emit(f"trunc i64 {flat} to i32")
    bits = _hash32(f, f.emit(f"xor i32 {_hash32(f, f.emit(f'xor i32 {index}, {w0}'))}, {w1}"))
    top = f.emit(f"uitofp i32 {f.emit(f'lshr i32 {bits}, 8')} to {IR_TYPE[out]}")
    return f.emit(f"fmul {IR_TYPE[out]} {top}, {const(2.0 ** -24, out)}")


def _one_hot(f, args, dts, attrs, out):
    label, cls = args
    label = cast(f, label, dts[0], DType.i64)
    f.check_label(label, cls, attrs["depth"])
    hit = f.emit(f"icmp eq i64 {label}, {cls}")
    return f.emit(f"select i1 {hit}, {IR_TYPE[out]} {const(1, out)}, {IR_TYPE[out]} {const(0, out)}")


# erf in f32 as Eigen's and XLA's fast form: a rational function of x clamped to [-4, 4] (erf is
# +-1 in f32 beyond), within a few ulp, and vectorizable, where a call of the C library's erff per
# element is not (GELU applies it to every hidden unit of a transformer's MLP). f64 and f16 call
# the C library.
_ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
            -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
            -1.60960333262415e-02)
_ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
            -7.37332916720468e-03, -1.42647390514189e-02)


@_calls("erf")      # f64 (fmax and fmin, llvm.maximum/minimum, are the extrema's)
def _erf(f, args, dts, attrs, out):
    if out is not DType.f32:
        return _float_call("erf")(f, args, dts, attrs, out)
    t = "float"
    # llvm.minimum/maximum propagate NaN, so erf(NaN) stays NaN
    low = f.call("llvm.minimum.f32", t, [(t, args[0]), (t, const(4.0, out))])
    x = f.call("llvm.maximum.f32", t, [(t, low), (t, const(-4.0, out))])
    x2 = f.emit(f"fmul {FLAGS} float {x}, {x}")

    def horner(coefs):
        acc = const(coefs[0], out)
        for c in coefs[1:]:
            acc = f.emit(f"fadd {FLAGS} float {f.emit(f'fmul {FLAGS} float {acc}, {x2}')}, {const(c, out)}")
        return acc
    num = f.emit(f"fmul {FLAGS} float {x}, {horner(_ERF_NUM)}")
    return f.emit(f"fdiv {FLAGS} float {num}, {horner(_ERF_DEN)}")


def _causal_mask(f, args, dts, attrs, out):
    x, row, col = args
    keep = f.emit(f"icmp sle i64 {col}, {row}")
    return f.emit(f"select i1 {keep}, {IR_TYPE[out]} {x}, {IR_TYPE[out]} {const(attrs['value'], out)}")


LOWER = {
    "neg": _neg, "abs": _abs, "relu": _relu, "sigmoid": _sigmoid, "stop_gradient": _identity,
    "exp": _calls("exp")(_exp), "log": _float_call("log"), "sqrt": _float_call("sqrt"),
    "log1p": _float_call("log1p"), "tanh": _float_call("tanh"),
    "erf": _erf,
    "add": _arith("fadd", "add"), "sub": _arith("fsub", "sub"), "mul": _arith("fmul", "mul"),
    "div": _arith("fdiv", "sdiv"), "pow": _pow,
    "maximum": _extremum("maximum", "smax", "or"), "minimum": _extremum("minimum", "smin", "and"),
    "greater": _compare("ogt", "sgt"), "greater_equal": _compare("oge", "sge"),
    "less": _compare("olt", "slt"), "less_equal": _compare("ole", "sle"),
    "equal": _compare("oeq", "eq"), "not_equal": _compare("une", "ne"),
    "where": _where, "cast": _cast, "uniform": _uniform, "one_hot": _one_hot,
    "causal_mask": _causal_mask,
}
# Primitives this backend declines (none): with LOWER and the planner's ops
# (kernels/tables.PLANNED) they cover the op table (tests/test_lowering_tables.py).
# all_reduce: no kernel can wait on MPI; a graph with one runs split at it, its buffer reduced by
# the host between two native calls (graphc/backends/split.py, docs/distributed.md).
UNSUPPORTED: frozenset[str] = frozenset({"all_reduce"})


def libm_functions() -> list[str]:
    """The C math functions generated code may call, as the table's entries declare them (a max
    reduction's llvm.maximum, rendered outside the table, is maximum's fmax)."""
    return sorted({name for lower in LOWER.values() for name in getattr(lower, "libm", ())})
