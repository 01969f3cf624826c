"""Tensor types: dtypes, shapes with symbolic dimensions, and their printed form (`f32[N, 784]`)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

Dim = int | str          # a concrete size, or a symbolic one such as "N"
Shape = tuple[Dim, ...]


class DType(enum.Enum):
    f16 = "f16"
    bf16 = "bf16"
    f32 = "f32"
    f64 = "f64"
    i32 = "i32"
    i64 = "i64"
    bool = "bool"

    @property
    def is_float(self) -> bool:
        return self in (DType.f16, DType.bf16, DType.f32, DType.f64)

    @property
    def is_int(self) -> bool:
        return self in (DType.i32, DType.i64)

    @property
    def numpy(self) -> np.dtype:
        if self is DType.bf16:
            raise NotImplementedError("bf16 has no numpy dtype; the numpy backend does not run it")
        return np.dtype(_NUMPY_NAMES[self])

    @classmethod
    def from_numpy(cls, dtype) -> DType:
        name = np.dtype(dtype).name
        for dt, np_name in _NUMPY_NAMES.items():
            if np_name == name:
                return dt
        raise KeyError(name)

    def __str__(self) -> str:
        return self.value


_NUMPY_NAMES = {DType.f16: "float16", DType.f32: "float32", DType.f64: "float64",
                DType.i32: "int32", DType.i64: "int64", DType.bool: "bool"}

DTYPE_NAMES = {d.value: d for d in DType}


def format_shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_concrete(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def size(self) -> int:
        assert self.is_concrete, f"internal error: size of symbolic type {self}"
        return math.prod(self.shape)     # Python ints: never wraps

    def with_shape(self, shape: Shape) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> TensorType:
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}{format_shape(self.shape)}"


# What a shape may hold (docs/language.md states them): every size and every tensor's fixed part
# (the product of its known sizes) fit an int32 index, so no size arithmetic overflows anywhere.
MAX_DIM = 2**31 - 1
MAX_ELEMENTS = 2**31 - 1


def shape_problem(shape: Shape) -> str | None:
    """Why a shape is beyond graphc's limits (to follow "... is too large: "), or None."""
    fixed = 1
    for d in shape:
        coef = dim_factors(d)[0]
        if coef > MAX_DIM:
            return f"the size {coef:,} is over the limit of {MAX_DIM:,}"
        fixed *= coef
    if fixed > MAX_ELEMENTS:
        return (f"its known sizes multiply to {fixed:,} elements, over the limit of "
                f"{MAX_ELEMENTS:,}")
    return None


def dim_factors(d: int | str) -> tuple[int, tuple[str, ...]]:
    """A size as a coefficient and symbols: 784 -> (784, ()), "N" -> (1, ("N",)). Compilers make
    products such as "576*N" (a batch of images flattened to rows for a matrix product); .nn files
    name single symbols only."""
    if isinstance(d, int):
        return d, ()
    coef, syms = 1, []
    for factor in d.split("*"):
        if factor.isdigit():
            coef *= int(factor)
        else:
            syms.append(factor)
    return coef, tuple(sorted(syms))


def product_dim(coef: int, syms) -> int | str:
    """The size coef * product(syms), written as dim_factors reads it."""
    syms = sorted(syms)
    if not syms:
        return coef
    return "*".join(([str(coef)] if coef != 1 else []) + syms)


def symbols(shape: Shape) -> set[str]:
    return {s for d in shape for s in dim_factors(d)[1]}


def bind_shape(shape: Shape, dims: dict[str, int]) -> tuple[int, ...]:
    """Substitute concrete sizes for symbolic dimensions."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif d in dims:
            out.append(dims[d])
        else:
            coef, syms = dim_factors(d)
            for s in syms:
                coef *= dims[s]
            out.append(coef)
    return tuple(out)
