"""The kernel IR: what the fusion planner produces and every compiled backend renders.

A kernel is a loop nest over an iteration space (sizes may be symbolic, such as the batch N), some
axes of which may be reduced. It reads buffers through strided accesses (a stride of 0 broadcasts)
and stores expressions over those loads. Matrix products are kernels too, with a marker that lets
a backend call a BLAS instead of rendering the loop. Buffers are the program's inputs, parameters,
optimizer state, and temporaries that the memory planner places in one arena per batch shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from graphc.ir.node import Node
from graphc.ir.types import DType, Shape, dim_factors

# A size is a monomial: coefficient times the product of symbolic dimensions, e.g. (784, ("N",)).
Size = tuple[int, tuple[str, ...]]
# An offset is a sum of monomials (slices of slices add up).
Offset = tuple[Size, ...]

ONE: Size = (1, ())
ZERO: Size = (0, ())


def size_of(dim: int | str) -> Size:
    return dim_factors(dim)


def smul(a: Size, b: Size) -> Size:
    if a[0] == 0 or b[0] == 0:
        return ZERO
    return (a[0] * b[0], tuple(sorted(a[1] + b[1])))


def sprod(sizes) -> Size:
    out = ONE
    for s in sizes:
        out = smul(out, s)
    return out


def sval(s: Size, dims: dict[str, int]) -> int:
    return s[0] * math.prod(dims[d] for d in s[1])


def sstr(s: Size) -> str:
    if not s[1]:
        return str(s[0])
    syms = "*".join(s[1])
    return syms if s[0] == 1 else f"{s[0]}*{syms}"


def row_major(shape: tuple[Size, ...]) -> tuple[Size, ...]:
    strides, acc = [], ONE
    for s in reversed(shape):
        strides.append(acc)
        acc = smul(acc, s)
    return tuple(reversed(strides))


def offset_add(off: Offset, term: Size) -> Offset:
    return off if term[0] == 0 else tuple(sorted(off + (term,)))


# --- expressions (hashable, so equal subexpressions are computed once) ---------------------------

@dataclass(frozen=True)
class Load:
    access: int                 # index into Kernel.loads
    dtype: DType


@dataclass(frozen=True)
class Const:
    value: int | float | bool
    dtype: DType


@dataclass(frozen=True)
class SizeOf:
    """A count known only at run time (the batch size), as a number of `dtype`."""
    size: Size
    dtype: DType


@dataclass(frozen=True)
class Index:
    """The loop index along one axis of the iteration space (one_hot's class index)."""
    axis: int


@dataclass(frozen=True)
class FlatIndex:
    """The row-major position in the iteration space (uniform's element counter)."""


@dataclass(frozen=True)
class Op:
    op: str                     # a primitive of the op table
    args: tuple
    attrs: tuple                # the node's frozen attributes
    dtype: DType

    @property
    def attr(self) -> dict:
        return dict(self.attrs)


Expr = Load | Const | SizeOf | Index | FlatIndex | Op


def walk(exprs) -> list:
    """Every distinct node of expression DAGs, each once."""
    seen: set = set()
    out: list = []
    stack = list(exprs)
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        out.append(e)
        if isinstance(e, Op):
            stack.extend(e.args)
    return out


def expr_ops(expr: Expr) -> list[Op]:
    """Every distinct Op of an expression DAG (each once)."""
    return [e for e in walk([expr]) if isinstance(e, Op)]


# --- buffers, accesses, kernels ------------------------------------------------------------------

@dataclass(frozen=True)
class Buffer:
    id: int
    dtype: DType
    shape: tuple[Size, ...]     # elements, row-major
    kind: str                   # input | param | state | temp
    name: str | None = None     # the source's name for input, param and state

    @property
    def elements(self) -> Size:
        return sprod(self.shape)


@dataclass(frozen=True)
class Access:
    """Element (i_0, ..., i_r-1) of the iteration space lives at offset + sum(i_k * strides[k])."""
    buffer: int
    strides: tuple[Size, ...]
    offset: Offset = ()


@dataclass(frozen=True)
class Store:
    access: Access
    expr: Expr
    reduce: str | None = None   # None (one value per point), "sum", "max" or "mean"
    node: Node | None = field(default=None, compare=False)


@dataclass
class Kernel:
    name: str
    space: tuple[Size, ...]
    reduce_axes: tuple[int, ...]
    loads: list[Access]
    stores: list[Store]
    nodes: list[Node]                       # the IR nodes it computes, in order
    matmul: tuple[int, int] | None = None   # (load of A, load of B): space is [.., M, K, N], K reduced
    window_axes: int = 0                    # the last axes are a window's offsets (a scatter): kept innermost

    @property
    def label(self) -> str:
        named = [n.name for n in self.nodes if n.name]
        return ", ".join(dict.fromkeys(named)) or self.nodes[-1].op


@dataclass
class KernelPlan:
    """A graph as kernels over buffers. `outputs` maps each graph output to its layout."""
    name: str
    buffers: list[Buffer]
    kernels: list[Kernel]
    outputs: list[tuple[str, Access, tuple[Size, ...], DType]]   # name, layout, shape, dtype
    symbols: tuple[str, ...]                # the symbolic dimensions, in the order backends pass them
    aliases: dict[int, int] = field(default_factory=dict)   # in-place: buffer -> buffer it reuses


def dims_of(shape: Shape) -> tuple[Size, ...]:
    return tuple(size_of(d) for d in shape)


# --- normalization shared by the renderers ----------------------------------------------------------

def _index_axes(kernel: Kernel) -> set[int]:
    return {e.axis for e in walk(s.expr for s in kernel.stores) if isinstance(e, Index)}


def _remap_index(expr, mapping: dict[int, int], memo: dict):
    if expr in memo:
        return memo[expr]
    if isinstance(expr, Index):
        out = Index(mapping[expr.axis])
    elif isinstance(expr, Op):
        out = Op(expr.op, tuple(_remap_index(a, mapping, memo) for a in expr.args), expr.attrs, expr.dtype)
    else:
        out = expr
    memo[expr] = out
    return out


def memory_order(kernel: Kernel) -> Kernel:
    """The same kernel with its loops in the order memory is walked (outermost the largest
    stride) where that is not the space's own order: an elementwise kernel by its first store, a
    reduction over trailing axes by its first load (the kept axes only). An image stored
    [C, N, H, W] is then streamed. Matrix products, kernels that read what they write in place
    (col2im's order is its own) and kernels that read their position (one_hot's Index, uniform's
    FlatIndex) keep their order; a reduction over other axes than the trailing ones becomes one
    over trailing axes where memory allows (`_kept_outermost`), else keeps its order. A
    scatter's window offsets (`window_axes`) stay innermost: each window's elements are computed
    together (max-pooling's gradient reads its whole window at each of them)."""
    if kernel.matmul is not None or not kernel.stores:
        return kernel
    rank = len(kernel.space)
    kept = rank - len(kernel.reduce_axes)
    if kernel.reduce_axes and not kernel.loads:
        return kernel
    if {a.buffer for a in kernel.loads} & {s.access.buffer for s in kernel.stores}:
        return kernel
    if any(isinstance(e, (Index, FlatIndex)) for e in walk(s.expr for s in kernel.stores)):
        return kernel
    strides = (kernel.loads[0] if kernel.reduce_axes else kernel.stores[0].access).strides
    if kernel.reduce_axes and set(kernel.reduce_axes) != set(range(kept, rank)):
        return _kept_outermost(kernel)
    kept -= kernel.window_axes
    order = sorted(range(kept), key=lambda a: -stride_weight(strides[a])) + list(range(kept, rank))
    return _permuted(kernel, order, kernel.reduce_axes)


def stride_weight(size: Size) -> float:
    """A stride's rank among others for ordering axes: symbolic ones (a multiple of the batch)
    outweigh constants."""
    return size[0] * 1e6 ** len(size[1])


def _kept_outermost(kernel: Kernel) -> Kernel:
    """A reduction over other axes than the trailing ones (a convolution's bias gradient: an
    image [N, C, H, W] summed over N, H and W), reordered to a reduction over trailing axes where
    every load lays its kept axes out outside its reduced ones (that image stored [C, N, H, W],
    as a product leaves it; a load broadcast along an axis does not count it): then each
    result's terms are read in one run along memory, the sum is kept in registers, and the
    kernel splits across threads by its kept axes. Otherwise it keeps its order (a row-major
    [N, F] summed over N, even times a broadcast [F], reads its rows in order and adds each into
    the results)."""
    if kernel.window_axes:
        return kernel
    rank = len(kernel.space)
    kept = [a for a in range(rank) if a not in kernel.reduce_axes and kernel.space[a] != ONE]
    summed = [a for a in kernel.reduce_axes if kernel.space[a] != ONE]
    if not kept or not summed:
        return kernel
    streamed = []
    for load in kernel.loads:
        outer = [stride_weight(load.strides[a]) for a in kept if load.strides[a] != ZERO]
        inner = [stride_weight(load.strides[a]) for a in summed if load.strides[a] != ZERO]
        if outer and inner and min(outer) <= max(inner):
            return kernel
        if inner:
            streamed.append(load)
    if not streamed:
        return kernel
    strides = streamed[0].strides
    kept = [a for a in range(rank) if a not in kernel.reduce_axes]
    order = (sorted(kept, key=lambda a: -stride_weight(strides[a]))
             + sorted(kernel.reduce_axes, key=lambda a: -stride_weight(strides[a])))
    return _permuted(kernel, order, tuple(range(len(kept), rank)))


def _permuted(kernel: Kernel, order: list[int], reduce_axes: tuple[int, ...]) -> Kernel:
    """The kernel with its loops in `order` (outermost first), reducing `reduce_axes`."""
    if order == list(range(len(kernel.space))):
        return kernel

    def permute(a: Access) -> Access:
        return Access(a.buffer, tuple(a.strides[k] for k in order), a.offset)
    return Kernel(kernel.name, tuple(kernel.space[k] for k in order), reduce_axes,
                  [permute(a) for a in kernel.loads],
                  [Store(permute(s.access), s.expr, s.reduce, s.node) for s in kernel.stores],
                  kernel.nodes, None, kernel.window_axes)


def coalesce(kernel: Kernel) -> Kernel:
    """The same kernel over fewer, longer loops: axes of size 1 are dropped, and neighbouring axes
    that every access walks as one (stride[k] == stride[k+1] * size[k+1]) are merged, so an
    elementwise kernel over [N, 256] becomes one loop of N*256. Axes read by Index stay."""
    if kernel.matmul is not None:
        return kernel
    pinned = _index_axes(kernel)
    accesses = list(kernel.loads) + [s.access for s in kernel.stores]
    axes = [k for k in range(len(kernel.space)) if kernel.space[k] != ONE or k in pinned]
    groups: list[list[int]] = []
    for k in axes:
        if groups:
            prev = groups[-1][-1]
            same_kind = (prev in kernel.reduce_axes) == (k in kernel.reduce_axes)
            walks_as_one = all(a.strides[prev] == smul(a.strides[k], kernel.space[k]) for a in accesses)
            if same_kind and walks_as_one and prev not in pinned and k not in pinned:
                groups[-1].append(k)
                continue
        groups.append([k])
    if len(groups) == len(kernel.space):
        return kernel
    space = tuple(sprod(kernel.space[k] for k in g) for g in groups)
    reduce_axes = tuple(i for i, g in enumerate(groups) if g[0] in kernel.reduce_axes)

    def remap(a: Access) -> Access:
        return Access(a.buffer, tuple(a.strides[g[-1]] for g in groups), a.offset)

    mapping = {g[0]: i for i, g in enumerate(groups) if len(g) == 1}
    memo: dict = {}
    stores = [Store(remap(s.access), _remap_index(s.expr, mapping, memo), s.reduce, s.node)
              for s in kernel.stores]
    first_window = len(kernel.space) - kernel.window_axes
    window_axes = sum(1 for g in groups if g[0] >= first_window)
    return Kernel(kernel.name, space, reduce_axes, [remap(a) for a in kernel.loads], stores,
                  kernel.nodes, kernel.matmul, window_axes)
