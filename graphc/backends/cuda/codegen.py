"""Renders kernel plans as CUDA C: the second renderer of the plans the llvm backend compiles
(graphc/backends/kernels), not a second compiler. A program's graphs become one translation unit: a
`__global__` function per distinct kernel and, per graph, a launch table (which kernel, on which
buffers, with which grid) that the runtime replays. The text is meant to be read and compiled by
anyone: `graphc build FILE --backend cuda --emit-source DIR` writes it, self-contained.

Every kernel takes its buffers, then `dims` (the symbolic sizes, in plan.symbols order, in device
memory), `status` (three words a failed check fills: code, value, and the kernel's last argument)
and that argument, which says where it runs (the runtime passes the graph's number << 16 | the index
of the launch's first kernel). A kernel's blocks return at once when `status` already holds a
failure, so nothing after a failed check (a label out of range) writes anything: the step stops
before any update, as on the other backends, without the host synchronizing after each launch.

Launches (schedule.py): a GEMM runs the elementwise kernels that read its result point by point
as its epilogue (bias, activation, ReLU's gradient mask, a weight's optimizer update); the other
optimizer updates share one launch over the concatenation of their spaces.

Kernel shapes:
- elementwise: one thread per point of the (coalesced) iteration space, grid-stride;
- reductions over trailing axes (softmax rows, the loss): one warp per output row, lanes striding
  along the row, combined with warp shuffles;
- other reductions (bias gradients: columns): one thread per output element, consecutive threads
  on consecutive columns, so reads are coalesced;
- matrix products: the tiled GEMM of gemm.py (float4 tile loads where the operand allows, TF32
  tensor cores behind `precision="tf32"`).
f32 arithmetic is IEEE (nvcc's defaults: -prec-div, -prec-sqrt; multiply-adds may contract into
FMAs, as on the llvm backend), except TF32 GEMMs, which round their inputs (docs/cuda.md).

Over 500 lines on purpose: the whole CUDA C renderer (kernel shapes, the launch table, the
per-op lowering table) in one file, as the text it writes is one translation unit.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from graphc.backends.cuda import gemm
from graphc.backends.cuda.schedule import Group, as_launched, schedule
from graphc.backends.kernels.ir import (
    ONE,
    Const,
    FlatIndex,
    Index,
    Kernel,
    KernelPlan,
    Load,
    Op,
    SizeOf,
    coalesce,
    sprod,
    sstr,
)
from graphc.backends.kernels.tables import render_failure
from graphc.ir.primitives import hash32
from graphc.ir.types import DType
from graphc.targets import PRECISIONS

CODEGEN_VERSION = "2"
STORE_TYPE = {DType.f16: "__half", DType.f32: "float", DType.f64: "double", DType.i32: "int",
              DType.i64: "long long", DType.bool: "unsigned char"}
VALUE_TYPE = {**STORE_TYPE, DType.f16: "float", DType.bool: "bool"}   # half computes in float
BLOCK = 256                     # threads per block of elementwise and reduction kernels
GEMM_BM, GEMM_BN, GEMM_THREADS = gemm.BM, gemm.BN, gemm.THREADS


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a graph: grid size as an expression over the dims (see `grid`)."""
    kernel: str
    buffers: tuple[int, ...]
    kind: str                   # "points" | "rows" | "outputs" | "gemm"
    work: tuple                 # sizes the grid is computed from (monomials; points: their sum)
    index: int                  # the first kernel's position in its graph (for failed checks)
    kernels: tuple[int, ...] = ()   # the plan's kernels it runs, in order


def _comment(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_#@.,:()\[\] *+=-]", "?", text)


def literal(value, dtype: DType) -> str:
    """A C literal of `dtype`: floats as exact hexadecimal literals."""
    if dtype is DType.bool:
        return "true" if value else "false"
    if dtype.is_int:
        return f"{int(value)}LL" if dtype is DType.i64 else str(int(value))
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):       # no literal spells these
        bits = np.array(v, np.float64 if dtype is DType.f64 else np.float32)
        if dtype is DType.f64:
            return f"__longlong_as_double({int(bits.view(np.int64))}LL)"
        return f"__int_as_float({int(bits.view(np.int32))})"
    if dtype is DType.f64:
        return v.hex()
    rounded = np.float16(v) if dtype is DType.f16 else np.float32(v)     # the value of the type
    return f"{float(rounded).hex()}f"


PRELUDE = r"""// graphc: generated CUDA C (renderer version VERSION)
#include <cuda_fp16.h>

typedef long long i64;

__device__ __forceinline__ float gc_max(float a, float b) { return a != a ? a : (b != b ? b : fmaxf(a, b)); }
__device__ __forceinline__ float gc_min(float a, float b) { return a != a ? a : (b != b ? b : fminf(a, b)); }
__device__ __forceinline__ double gc_max(double a, double b) {
    return a != a ? a : (b != b ? b : fmax(a, b));
}
__device__ __forceinline__ double gc_min(double a, double b) {
    return a != a ? a : (b != b ? b : fmin(a, b));
}
__device__ __forceinline__ int gc_max(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int gc_min(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ i64 gc_max(i64 a, i64 b) { return a > b ? a : b; }
__device__ __forceinline__ i64 gc_min(i64 a, i64 b) { return a < b ? a : b; }
__device__ __forceinline__ bool gc_max(bool a, bool b) { return a || b; }
__device__ __forceinline__ bool gc_min(bool a, bool b) { return a && b; }

// lowbias32, as graphc.ir.primitives.hash32: dropout masks are the same on every backend.
__device__ __forceinline__ unsigned gc_hash32(unsigned x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; return x ^ (x >> 16);
}

// One failed check is kept (the first); every kernel launched after it returns at once.
__device__ __forceinline__ void gc_fail(i64* status, i64 code, i64 value, int kernel) {
    if (atomicCAS((unsigned long long*)status, 0ULL, (unsigned long long)code) == 0ULL) {
        status[1] = value;
        status[2] = kernel;
    }
}
""".replace("VERSION", CODEGEN_VERSION)


class _Body:
    """The statements of one kernel being written, with fresh names."""

    def __init__(self):
        self.lines: list[str] = []
        self.counter = 0

    def let(self, ctype: str, value: str, hint: str = "v", maybe_unused: bool = False) -> str:
        self.counter += 1
        name = f"{hint}{self.counter}"
        attribute = "[[maybe_unused]] " if maybe_unused else ""   # an index no access reads
        self.lines.append(f"{attribute}{ctype} {name} = {value};")
        return name

    def do(self, line: str) -> None:
        self.lines.append(line)


class Module:
    def __init__(self, precision: str = "f32"):
        assert precision in PRECISIONS, f"internal error: unknown precision {precision}"
        self.precision = precision
        self.functions: dict[str, str] = {}      # name -> source; equal kernels once
        self.tables: list[str] = []
        self.launches: dict[str, list[Launch]] = {}
        self.plan: KernelPlan | None = None

    def resolve(self, buffer: int) -> int:
        return self.plan.aliases.get(buffer, buffer)

    def size(self, s) -> str:
        """C expression of a size monomial."""
        if not s[1]:
            return f"{s[0]}LL"
        terms = [f"dims[{self.plan.symbols.index(sym)}]" for sym in s[1]]
        if s[0] != 1:
            terms.insert(0, f"{s[0]}LL")
        return "(" + " * ".join(terms) + ")"

    def offset(self, offset) -> str:
        return " + ".join(self.size(t) for t in offset) if offset else "0"

    # --- launches --------------------------------------------------------------------------------

    def render_launch(self, group: Group) -> Launch:
        """One `__global__` function running the group's kernels (see schedule.py)."""
        kernels = [self.plan.kernels[i] for i in group.kernels]
        if group.kind != "gemm":
            kernels = [coalesce(k) for k in kernels]
        buffers = sorted({self.resolve(a.buffer) for k in kernels for a in k.loads}
                         | {self.resolve(s.access.buffer) for k in kernels for s in k.stores})
        if group.kind == "gemm" and len(kernels) > 1:
            # An epilogue's results stay in registers where nothing else reads them.
            dropped = {self.resolve(s.access.buffer) for k in kernels for s in k.stores
                       if not self._needed(s.access.buffer, group)}
            buffers = [b for b in buffers if b not in dropped]
        self.args = {b: f"b{i}" for i, b in enumerate(buffers)}
        self.kernel = kernels[0]
        written = {self.resolve(s.access.buffer) for k in kernels for s in k.stores}
        params = ", ".join(
            f"{'' if b in written else 'const '}{STORE_TYPE[self.plan.buffers[b].dtype]}* "
            f"__restrict__ {self.args[b]}" for b in buffers)
        body = _Body()
        kernel = kernels[0]
        if group.kind == "gemm":
            kind, work = "gemm", (kernel.space[0], kernel.space[2])
            # Two blocks per multiprocessor: with the block size alone, ptxas spills a few
            # registers of some tiles (seen with K = 128, N = 3136) that fit without spilling.
            bounds = f"__launch_bounds__({GEMM_THREADS}, 2) "
            self._gemm(body, kernels, group)
        elif group.kind == "points" or not kernel.reduce_axes:
            kind, work, bounds = "points", tuple(sprod(k.space) for k in kernels), ""
            self._points(body, kernels)
        elif self._trailing(kernel):
            outer = kernel.space[: min(kernel.reduce_axes)]
            kind, work, bounds = "rows", (sprod(outer),), ""
            self._rows(body, kernel)
        else:
            kept = [s for a, s in enumerate(kernel.space) if a not in kernel.reduce_axes]
            kind, work, bounds = "outputs", (sprod(kept),), ""
            self._outputs(body, kernel)
        # The early exit is decided once per block, so that the threads of a block (and the
        # lanes of a warp, which shuffle together) leave together.
        text = (f"({params}, const i64* __restrict__ dims, i64* status, int kernel) {{\n"
                "    __shared__ int stop;\n"
                "    if (threadIdx.x == 0) stop = status[0] != 0;\n"
                "    __syncthreads();\n"
                "    if (stop) return;\n"
                + "".join(f"    {line}\n" for line in body.lines) + "}\n")
        header = "\n".join(
            f"// {_comment(k.label)}: space [{', '.join(sstr(s) for s in k.space)}]"
            + (f", reduce {list(k.reduce_axes)}" if k.reduce_axes else "") for k in kernels)
        header += f"\n// {kind}" + (f" ({len(kernels)} kernels in one launch)" if len(kernels) > 1 else "")
        stem = "updates" if group.kind == "points" and len(kernels) > 1 else kernel.name.split("_", 1)[-1]
        name = f"gc_{stem}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"
        self.functions.setdefault(
            name, f'{header}\nextern "C" __global__ void {bounds}{name}{text}')
        return Launch(name, tuple(buffers), kind, work, group.kernels[0], group.kernels)

    def _trailing(self, kernel: Kernel) -> bool:
        r = len(kernel.space)
        return sorted(kernel.reduce_axes) == list(range(r - len(kernel.reduce_axes), r))

    def _decompose(self, body: _Body, flat: str, axes: list[int], hint: str) -> dict[int, str]:
        """Indices along `axes` (row-major) of position `flat` in their sub-space."""
        index: dict[int, str] = {}
        rem = flat
        for n, a in enumerate(reversed(axes)):
            if n == len(axes) - 1:
                index[a] = body.let("i64", rem, f"{hint}{a}_", maybe_unused=True)
            else:
                size = self.size(self.kernel.space[a])
                index[a] = body.let("i64", f"{rem} % {size}", f"{hint}{a}_", maybe_unused=True)
                rem = body.let("i64", f"{rem} / {size}", "q")
        return index

    def _points(self, body: _Body, kernels: list[Kernel]) -> None:
        """One thread per point, grid-stride over the concatenation of the kernels' spaces (the
        optimizer's updates of every parameter in one launch): each point runs the kernel whose
        part of the concatenation it falls in."""
        ends: list[str] = []
        for k in kernels:
            size = self.size(sprod(k.space))
            ends.append(body.let("i64", f"{ends[-1]} + {size}" if ends else size, "end"))
        body.do(f"for (i64 p = blockIdx.x * (i64)blockDim.x + threadIdx.x; p < {ends[-1]}; "
                "p += (i64)blockDim.x * gridDim.x) {")
        for n, k in enumerate(kernels):
            self.kernel = k
            inner = _Body()
            inner.counter = body.counter
            at = "p" if n == 0 else inner.let("i64", f"p - {ends[n - 1]}", "q")
            index = self._decompose(inner, at, list(range(len(k.space))), "i")
            values = _Values(self, inner, index, at)
            for s in k.stores:
                self._store(inner, s.access, s.expr.dtype, values.expr(s.expr), index)
            body.counter = inner.counter
            if len(kernels) == 1:
                body.lines += ["    " + line for line in inner.lines]
                continue
            opening = "if" if n == 0 else "} else if"
            body.do(f"    {opening} (p < {ends[n]}) {{" if n < len(kernels) - 1 else "    } else {")
            body.lines += ["        " + line for line in inner.lines]
        if len(kernels) > 1:
            body.do("    }")
        body.do("}")

    def _rows(self, body: _Body, kernel: Kernel) -> None:
        first = min(kernel.reduce_axes)
        outer_axes, red_axes = list(range(first)), list(range(first, len(kernel.space)))
        rows = body.let("i64", self.size(sprod(kernel.space[a] for a in outer_axes)), "rows")
        width = body.let("i64", self.size(sprod(kernel.space[a] for a in red_axes)), "width")
        body.do("const int lane = threadIdx.x & 31;")
        body.do(f"for (i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5; row < {rows}; "
                "row += ((i64)blockDim.x * gridDim.x) >> 5) {")
        inner = _Body()
        index = self._decompose(inner, "row", outer_axes, "o") if outer_axes else {}
        reducing, accs = self._accumulate(inner, kernel, index, red_axes,
                                          f"for (i64 r = lane; r < {width}; r += 32) {{")
        for acc, s in zip(accs, reducing):
            inner.do("#pragma unroll")
            inner.do("for (int o = 16; o > 0; o >>= 1) "
                     f"{acc} = {self._combine(s, acc, f'__shfl_down_sync(0xffffffffu, {acc}, o)')};")
        inner.do("if (lane == 0) {")
        self._store_results(inner, reducing, accs, index, red_axes, width, indent="    ")
        inner.do("}")
        body.lines += ["    " + line for line in inner.lines] + ["}"]

    def _outputs(self, body: _Body, kernel: Kernel) -> None:
        kept = [a for a in range(len(kernel.space)) if a not in kernel.reduce_axes]
        red = sorted(kernel.reduce_axes)
        outs = body.let("i64", self.size(sprod(kernel.space[a] for a in kept)), "outs")
        count = body.let("i64", self.size(sprod(kernel.space[a] for a in red)), "count")
        body.do(f"for (i64 o = blockIdx.x * (i64)blockDim.x + threadIdx.x; o < {outs}; "
                "o += (i64)blockDim.x * gridDim.x) {")
        inner = _Body()
        index = self._decompose(inner, "o", kept, "o") if kept else {}
        reducing, accs = self._accumulate(inner, kernel, index, red,
                                          f"for (i64 r = 0; r < {count}; ++r) {{")
        self._store_results(inner, reducing, accs, index, red, count)
        body.lines += ["    " + line for line in inner.lines] + ["}"]

    def _accumulate(self, inner: _Body, kernel: Kernel, index: dict[int, str], red_axes: list[int],
                    loop: str) -> tuple[list, list[str]]:
        """Accumulators for the reducing stores and `loop` over the reduced axes around one point:
        reducing stores combine into their accumulator, the others are stored at the point.
        Returns (the reducing stores, their accumulators)."""
        reducing = [s for s in kernel.stores if s.reduce]
        accs = [inner.let(VALUE_TYPE[s.expr.dtype], self._identity(s), "acc") for s in reducing]
        inner.do(loop)
        point = _Body()
        point.counter = inner.counter
        full = {**index, **self._decompose(point, "r", red_axes, "r")}
        values = _Values(self, point, full, self._flat_of(point, full))
        k = 0
        for s in kernel.stores:
            v = values.expr(s.expr)
            if s.reduce:
                point.do(f"{accs[k]} = {self._combine(s, accs[k], v)};")
                k += 1
            else:
                self._store(point, s.access, s.expr.dtype, v, full)
        inner.counter = point.counter
        inner.lines += ["    " + line for line in point.lines] + ["}"]
        return reducing, accs

    def _store_results(self, body: _Body, reducing: list, accs: list[str], index: dict[int, str],
                       red_axes: list[int], count: str, indent: str = "") -> None:
        """Each reduction's accumulator stored at its output (a mean divided by `count`)."""
        at = {**index, **{a: "0" for a in red_axes}}
        for acc, s in zip(accs, reducing):
            value = acc if s.reduce != "mean" else f"{acc} / ({VALUE_TYPE[s.expr.dtype]}){count}"
            self._store(body, s.access, s.expr.dtype, value, at, indent=indent)

    def _flat_of(self, body: _Body, index: dict[int, str]) -> str:
        flat = None
        for a, s in enumerate(self.kernel.space):
            i = index.get(a, "0")
            flat = i if flat is None else f"({flat}) * {self.size(s)} + {i}"
        return body.let("i64", flat or "0", "flat", maybe_unused=True)

    # --- matrix products -------------------------------------------------------------------------

    def _gemm(self, body: _Body, kernels: list[Kernel], group: Group) -> None:
        """The tiled GEMM (gemm.py) of kernels[0]; the other kernels are its epilogue."""
        head, epilogue = kernels[0], kernels[1:]
        (store,) = head.stores
        a_load, b_load = store.expr.args
        acc_a, acc_b = head.loads[a_load.access], head.loads[b_load.access]
        out = store.access

        def stride(access, axis):
            return self.size(access.strides[axis]) if access.strides[axis][0] else "0LL"

        def pointer(access):
            return f"{self.args[self.resolve(access.buffer)]} + ({self.offset(access.offset)})"
        strides = {"sam": stride(acc_a, 0), "sak": stride(acc_a, 1), "sbk": stride(acc_b, 1),
                   "sbn": stride(acc_b, 2), "scm": stride(out, 0), "scn": stride(out, 2)}
        pointers = {"A": pointer(acc_a), "B": pointer(acc_b)}
        point = self._epilogue(head, epilogue, group) if epilogue else None
        if point is None:
            pointers["C"] = pointer(out)
        body.lines += gemm.render(acc_a, acc_b, out, tuple(self.size(s) for s in head.space),
                                  strides, pointers, STORE_TYPE[store.expr.dtype], self.precision,
                                  point)

    def _needed(self, buffer: int, group: Group) -> bool:
        """Must the launch store this result: does anything outside it read the buffer?"""
        b = self.resolve(buffer)
        return (self.plan.buffers[b].kind != "temp" or b in self.outputs
                or bool(self.readers.get(b, set()) - set(group.kernels)))

    def _epilogue(self, head: Kernel, epilogue: list[Kernel], group: Group):
        """What the GEMM does at each element of C: the epilogue kernels at that point, reading
        the product (and each other's results) from registers; results that nothing outside the
        launch reads are never stored."""
        def needed(buffer: int) -> bool:
            return self._needed(buffer, group)

        def point(value: str, gm: str, gn: str) -> list[str]:
            body = _Body()
            out = head.stores[0].access
            held = {(self.resolve(out.buffer), (out.strides[0], out.strides[2]), out.offset): value}
            if needed(out.buffer):
                self._store(body, out, head.stores[0].expr.dtype, value, {0: gm, 2: gn})
            for k in epilogue:
                self.kernel = k
                values = _Values(self, body, {0: gm, 1: gn}, "0", held)
                for s in k.stores:
                    v = values.expr(s.expr)
                    if needed(s.access.buffer):
                        self._store(body, s.access, s.expr.dtype, v, {0: gm, 1: gn})
                    held[(self.resolve(s.access.buffer), s.access.strides, s.access.offset)] = v
            return body.lines
        return point

    # --- values, stores, reductions ----------------------------------------------------------------

    def address(self, access, index: dict[int, str]) -> str:
        terms = [self.offset(access.offset)] if access.offset else []
        for a, s in enumerate(access.strides):
            if s[0] == 0:
                continue
            i = index.get(a, "0")
            terms.append(i if s == ONE else f"{i} * {self.size(s)}")
        return f"{self.args[self.resolve(access.buffer)]}[{' + '.join(terms) or '0'}]"

    def load(self, access, dtype: DType, index: dict[int, str]) -> str:
        place = self.address(access, index)
        if dtype is DType.f16:
            return f"__half2float({place})"
        if dtype is DType.bool:
            return f"({place} != 0)"
        return place

    def _store(self, body: _Body, access, dtype: DType, value: str, index: dict[int, str],
               indent: str = "") -> None:
        if dtype is DType.f16:
            value = f"__float2half({value})"
        elif dtype is DType.bool:
            value = f"(unsigned char)({value})"
        body.do(f"{indent}{self.address(access, index)} = {value};")

    def _identity(self, store) -> str:
        dtype = store.expr.dtype
        if store.reduce == "max":
            if dtype.is_float:
                return literal(float("-inf"), dtype)
            lowest = {DType.i64: "(-9223372036854775807LL - 1)", DType.i32: "(-2147483647 - 1)"}
            return lowest.get(dtype, "false")
        return literal(0, dtype)

    def _combine(self, store, acc: str, value: str) -> str:
        if store.reduce == "max":
            return f"gc_max({acc}, {value})"
        return f"{acc} + {value}"

    # --- graphs ----------------------------------------------------------------------------------

    def render_graph(self, key: str, plan: KernelPlan) -> None:
        self.plan = plan
        self.readers: dict[int, set[int]] = {}
        for i, k in enumerate(plan.kernels):
            for a in k.loads:
                self.readers.setdefault(self.resolve(a.buffer), set()).add(i)
        self.outputs = {self.resolve(access.buffer) for _, access, _, _ in plan.outputs}
        launches = [self.render_launch(group) for group in schedule(plan)]
        self.launches[key] = launches
        lines = [f"// graph {_comment(plan.name)} ({key}): {len(launches)} launches, "
                 f"{len(plan.buffers)} buffers; symbols: {', '.join(plan.symbols) or 'none'}"]
        for buf in plan.buffers:
            where = f" -> b{plan.aliases[buf.id]} (in place)" if buf.id in plan.aliases else ""
            lines.append(f"//   b{buf.id}: {buf.kind} {_comment(buf.name or '')} {buf.dtype}"
                         f"[{', '.join(sstr(s) for s in buf.shape)}]{where}")
        for launch in launches:
            joined = " + " if launch.kind == "points" else " x "
            runs = ",".join(f"k{i}" for i in launch.kernels)
            lines.append(f"//   {runs}: {launch.kernel}<<<{launch.kind} of "
                         f"{joined.join(sstr(s) for s in launch.work)}>>>("
                         f"{', '.join(f'b{b}' for b in launch.buffers)})")
        self.tables.append("\n".join(lines))

    def text(self) -> str:
        prelude = PRELUDE + ("#include <mma.h>\n" if self.precision == "tf32" else "")
        return "\n".join([prelude] + list(self.functions.values()) + self.tables) + "\n"


class _Values:
    """C expressions of a kernel's values at one point, each computed once."""

    def __init__(self, module: Module, body: _Body, index: dict[int, str], flat: str,
                 held: dict | None = None):
        self.m, self.body, self.index, self.flat = module, body, index, flat
        self.held = held or {}          # (buffer, strides, offset) -> a value already in a register
        self.memo: dict = {}

    def expr(self, e) -> str:
        if e in self.memo:
            return self.memo[e]
        m, body = self.m, self.body
        if isinstance(e, Load):
            a = m.kernel.loads[e.access]
            v = self.held.get((m.resolve(a.buffer), a.strides, a.offset))
            if v is None:
                v = body.let(VALUE_TYPE[e.dtype], m.load(a, e.dtype, self.index))
        elif isinstance(e, Const):
            v = literal(e.value, e.dtype)
        elif isinstance(e, SizeOf):
            v = f"(({VALUE_TYPE[e.dtype]}){m.size(e.size)})"
        elif isinstance(e, Index):
            v = self.index.get(e.axis, "0")
        elif isinstance(e, FlatIndex):
            v = self.flat
        else:
            assert isinstance(e, Op), f"internal error: unknown expression {e}"
            args = [self.expr(a) for a in e.args]
            dts = [a.dtype if not isinstance(a, (Index, FlatIndex)) else DType.i64 for a in e.args]
            try:
                v = body.let(VALUE_TYPE[e.dtype], LOWER[e.op](self, args, dts, e.attr, e.dtype))
            except KeyError as err:     # no entry for the op, or none of its types for a dtype
                raise render_failure("cuda", e.op, e.dtype, dts, m.kernel.name) from err
        self.memo[e] = v
        return v


def _fn(name: str):
    def lower(values, args, dts, attrs, out):
        suffix = "" if out is DType.f64 else "f"
        return f"{name}{suffix}({args[0]})"
    return lower


def _binary(symbol: str):
    def lower(values, args, dts, attrs, out):
        return f"{args[0]} {symbol} {args[1]}"
    return lower


def _cast(values, args, dts, attrs, out):
    if dts[0] is out:
        return args[0]
    if out is DType.bool:
        return f"({args[0]} != 0)"
    return f"({VALUE_TYPE[out]})({args[0]})"


def _uniform(values, args, dts, attrs, out):
    body = values.body
    key = body.let("unsigned long long", f"(unsigned long long)({args[0]})", "key")
    stream = hash32(attrs["stream"] + 0x9E3779B9)
    w0 = body.let("unsigned", f"gc_hash32((unsigned){key} ^ {stream}u)", "w")
    w1 = body.let("unsigned", f"gc_hash32(gc_hash32((unsigned)({key} >> 32) + 0x632BE5ABu) ^ {w0})", "w")
    bits = body.let("unsigned", f"gc_hash32(gc_hash32((unsigned){args[1]} ^ {w0}) ^ {w1})", "bits")
    return f"({VALUE_TYPE[out]})({bits} >> 8) * {literal(2.0 ** -24, out)}"


def _one_hot(values, args, dts, attrs, out):
    label, cls = args
    depth = attrs["depth"]
    values.body.do(f"if ({cls} == 0 && ((unsigned long long)({label}) >= {depth}ULL)) "
                   f"gc_fail(status, 1, (i64)({label}), kernel);")
    return f"(({label}) == {cls} ? {literal(1, out)} : {literal(0, out)})"


def _causal_mask(values, args, dts, attrs, out):
    x, row, col = args
    return f"(({col}) <= ({row}) ? {x} : {literal(attrs['value'], out)})"


def _sigmoid(values, args, dts, attrs, out):
    one = literal(1, out)
    return f"{one} / ({one} + {'exp' if out is DType.f64 else 'expf'}(-{args[0]}))"


LOWER = {
    "neg": lambda v, a, d, at, o: f"-{a[0]}",
    "abs": lambda v, a, d, at, o: (f"fabs{'f' if o is not DType.f64 else ''}({a[0]})" if o.is_float
                                   else f"({a[0]} < 0 ? -{a[0]} : {a[0]})"),
    "relu": lambda v, a, d, at, o: f"gc_max({a[0]}, {literal(0, o)})",
    "sigmoid": _sigmoid, "stop_gradient": lambda v, a, d, at, o: a[0],
    "exp": _fn("exp"), "log": _fn("log"), "sqrt": _fn("sqrt"), "log1p": _fn("log1p"),
    "tanh": _fn("tanh"), "erf": _fn("erf"),
    "add": _binary("+"), "sub": _binary("-"), "mul": _binary("*"), "div": _binary("/"),
    "pow": lambda v, a, d, at, o: f"pow{'f' if o is not DType.f64 else ''}({a[0]}, {a[1]})",
    "maximum": lambda v, a, d, at, o: f"gc_max({a[0]}, {a[1]})",
    "minimum": lambda v, a, d, at, o: f"gc_min({a[0]}, {a[1]})",
    "greater": _binary(">"), "greater_equal": _binary(">="), "less": _binary("<"),
    "less_equal": _binary("<="), "equal": _binary("=="), "not_equal": _binary("!="),
    "where": lambda v, a, d, at, o: f"({a[0]} ? {a[1]} : {a[2]})",
    "cast": _cast, "uniform": _uniform, "one_hot": _one_hot, "causal_mask": _causal_mask,
}
# Primitives this backend declines (none): with LOWER and the planner's ops
# (kernels/tables.PLANNED) they cover the op table (tests/test_lowering_tables.py).
# all_reduce: no kernel can wait on MPI; a graph with one runs split at it, its buffer reduced by
# the host between two native calls (graphc/backends/split.py, docs/distributed.md).
UNSUPPORTED: frozenset[str] = frozenset({"all_reduce"})


def render_module(plans: dict[str, KernelPlan], precision: str = "f32"
                  ) -> tuple[str, dict[str, list[Launch]]]:
    """One translation unit for the graphs of a program, and each graph's launches.
    `precision`: "f32" (IEEE f32 throughout) or "tf32" (f32 GEMMs on the tensor cores)."""
    module = Module(precision)
    for key, plan in plans.items():
        module.render_graph(key, plan)
    return module.text(), module.launches


def launched(plan: KernelPlan) -> KernelPlan:
    """The plan with one kernel per launch, in launch order: what the arena must be planned on
    (`plan_arena(launched(plan), dims)`), since a launch may run kernels that the plan's order
    keeps apart."""
    return as_launched(plan, schedule(plan))
