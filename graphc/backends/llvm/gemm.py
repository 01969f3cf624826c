"""graphc's own single-precision GEMM (docs/backends.md, "Matrix products"), for the products
OpenBLAS runs below its best: short and wide ones, a convolution's `W @ columns` and `Wᵀ @ G` (K
of 9-288, N of tens of thousands of pixels), chosen by `picks` (`profitable` in IR) from `python
bench/gemm_shapes.py`'s measurements.

C[M, N] = A @ B with A read through any strides (plain or transposed), B's rows contiguous along
N, C row-major; `graphc_sgemm(args, blas)` takes the operands from a block of i64 words (ARGS) and
runs `graphc_sgemm_task` on the kernels' thread pool (threads.py) over panels of NR columns, or on
the calling thread when the host gave no pool. The task is the loop structure of BLIS (Van Zee
and van de Geijn, 2015) with one change of order for these shapes: per block of MC rows of A and
KC of its columns, A is packed once ([MC/MR][KC][MR], zero rows past M), then each panel of B
([KC][NR], zero columns past N) is packed (both into one block from malloc) and swept by the
microkernel, MR rows at a time: MR x NR sums in registers (8 x 48: 24 vectors of 16 floats), NV
vector loads of B and MR broadcasts of A per step of K. C's tile is stored with masks where the
panel passes N and added to what is there after the first block of K. Sized for AVX-512 (32
vector registers, 24 of them sums): elsewhere the vectors would be split and the sums spill, so
codegen.py calls it only where the host has AVX-512, or where GRAPHC_GEMM asks for it.
"""
from __future__ import annotations

import functools
import os

from graphc.backends.llvm.blas import load_words

MR = 8                  # rows of C per microkernel call
NV = 3                  # vectors of 16 floats per row of the tile
NR = 16 * NV            # columns of C per panel
KC = 384                # most columns of A (rows of B) per packed block
A_AREA = 96 * KC        # most floats of packed A (147 KB)
SCRATCH_BYTES = 4 * (A_AREA + KC * NR)   # packed A and one panel of B (221 KB, on the heap)
SHORT_K, NARROW, BIG = 320, 2048, 1 << 20    # `picks`: most K, fewest N, fewest multiply-adds
# ARGS: the words of the argument block, in order
ARGS = ("a", "b", "c", "m", "n", "k", "a_row", "a_col", "ldb", "ldc")
V = "<16 x float>"
MASK = "<16 x i1>"


def mode() -> str:
    """GRAPHC_GEMM: "auto" (the default: this kernel for the shapes `profitable` names, on
    hosts with AVX-512), "blas" (never) or "generated" (every product of a layout it takes that is
    not small)."""
    value = os.environ.get("GRAPHC_GEMM", "auto").strip().lower() or "auto"
    return value if value in ("auto", "blas", "generated") else "auto"


@functools.cache
def host_has_avx512() -> bool:
    from graphc.backends.llvm.jit import _llvm
    features = _llvm().get_host_cpu_features()
    return bool(features.get("avx512f"))


def wanted() -> bool:
    """Whether products may call this kernel (decided per product at run time, `profitable`)."""
    return mode() == "generated" or (mode() == "auto" and host_has_avx512())


def picks(m: int, k: int, n: int) -> bool:
    """The shapes where this kernel beats numpy's OpenBLAS (single-threaded, on both cores
    through the pool) here, `python bench/gemm_shapes.py`: a short K (at most SHORT_K: one
    packed block, C written once) and N of at least NARROW columns, with work enough (BIG).
    OpenBLAS stays ahead on long K (a linear layer's 9216 inputs, weight gradients over a
    batch) and on few columns. `profitable` is the same rule in IR."""
    return k <= SHORT_K and n >= NARROW and m * k * n >= BIG


def profitable(emit, m: str, k: str, n: str) -> str:
    """The IR of an i1: `picks` for the sizes m, k, n (IR values)."""
    short = emit(f"icmp ule i64 {k}, {SHORT_K}")
    wide = emit(f"icmp uge i64 {n}, {NARROW}")
    work = emit(f"mul i64 {emit(f'mul i64 {m}, {k}')}, {n}")
    return emit(f"and i1 {emit(f'and i1 {short}, {wide}')}, {emit(f'icmp uge i64 {work}, {BIG}')}")


def declarations() -> list[tuple[str, str, list[str]]]:
    """(name, return type, argument types) of the intrinsics the kernel calls."""
    return [("llvm.fma.v16f32", V, [V, V, V]),
            ("llvm.fma.f32", "float", ["float", "float", "float"]),
            ("malloc", "ptr", ["i64"]),
            ("free", "void", ["ptr"]),
            ("llvm.masked.load.v16f32.p0", V, ["ptr", "i32", MASK, V]),
            ("llvm.masked.store.v16f32.p0", "void", [V, "ptr", "i32", MASK]),
            ("llvm.umin.i64", "i64", ["i64", "i64"]),
            ("llvm.umax.i64", "i64", ["i64", "i64"])]


def functions() -> dict[str, str]:
    """The IR of graphc_sgemm and graphc_sgemm_task, by name."""
    return {"graphc_sgemm": _dispatch(), "graphc_sgemm_task": _task()}


def _dispatch() -> str:
    return f"""define internal void @graphc_sgemm(ptr %args, ptr %blas) noinline {{
entry:
  %np = getelementptr i64, ptr %args, i64 {ARGS.index("n")}
  %n = load i64, ptr %np
  %n1 = add i64 %n, {NR - 1}
  %panels = udiv i64 %n1, {NR}
  %poolp = getelementptr ptr, ptr %blas, i64 2
  %pool = load ptr, ptr %poolp
  %has = icmp ne ptr %pool, null
  %many = icmp ugt i64 %panels, 1
  %go = and i1 %has, %many
  br i1 %go, label %par, label %ser
par:
  call void @graphc_parallel(ptr %pool, ptr @graphc_sgemm_task, ptr %args, ptr null, ptr null, \
ptr %blas, i64 %panels)
  ret void
ser:
  call void @graphc_sgemm_task(ptr %args, ptr null, ptr null, ptr %blas, i64 0, i64 %panels)
  ret void
}}
"""


def _task() -> str:
    """Panels [lo, hi) of NR columns of C (the thread pool's task signature)."""
    loads = load_words(ARGS)
    return f"""define internal void @graphc_sgemm_task(ptr %args, ptr %dims, ptr %status, ptr %blas, \
i64 %lo, i64 %hi) noinline {{
entry:
{loads}
  ; the packed blocks on the heap (221 KB: too much for a thread's stack, which may be 128 KB)
  %mem = call ptr @malloc(i64 {SCRATCH_BYTES + 64})
  %got = icmp ne ptr %mem, null
  br i1 %got, label %start, label %naive.pre
start:
  %mem.i = ptrtoint ptr %mem to i64
  %mem.up = add i64 %mem.i, 63
  %mem.al = and i64 %mem.up, -64
  %ap = inttoptr i64 %mem.al to ptr
  %bp = getelementptr float, ptr %ap, i64 {A_AREA}
  ; blocks of K of equal length (at most KC), then of M (a multiple of MR, within A_AREA)
{_ceil_div("kblocks", "%k", KC)}
{_ceil_div("kcb", "%k", "%kblocks")}
  %mfit0 = udiv i64 {A_AREA}, %kcb
  %mfit1 = udiv i64 %mfit0, {MR}
  %mfit2 = mul i64 %mfit1, {MR}
  %mfit = call i64 @llvm.umax.i64(i64 %mfit2, i64 {MR})
{_ceil_div("mblocks", "%m", "%mfit")}
{_ceil_div("mb3", "%m", "%mblocks")}
{_ceil_div("mb5", "%mb3", MR)}
  %mcb = mul i64 %mb5, {MR}
  %mlast = sub i64 %m, 1
  br label %ic.head
ic.head:
  %ic = phi i64 [0, %start], [%ic.next, %pc.done]
  %ic.more = icmp ult i64 %ic, %m
  br i1 %ic.more, label %ic.body, label %done
ic.body:
  %mleft = sub i64 %m, %ic
  %mc = call i64 @llvm.umin.i64(i64 %mcb, i64 %mleft)
  br label %pc.head
pc.head:
  %pc = phi i64 [0, %ic.body], [%pc.next, %jp.done]
  %pc.more = icmp ult i64 %pc, %k
  br i1 %pc.more, label %pc.body, label %pc.done
pc.body:
  %kleft = sub i64 %k, %pc
  %kc = call i64 @llvm.umin.i64(i64 %kcb, i64 %kleft)
  %later = icmp ne i64 %pc, 0
{_pack_a()}
  br label %jp.head
jp.head:
  %jp = phi i64 [%lo, %pa.done], [%jp.next, %ir.done]
  %jp.more = icmp ult i64 %jp, %hi
  br i1 %jp.more, label %jp.body, label %jp.done
jp.body:
  %j = mul i64 %jp, {NR}
  %nleft = sub i64 %n, %j
  %nr = call i64 @llvm.umin.i64(i64 %nleft, i64 {NR})
{_masks()}
{_pack_b()}
  br label %ir.head
ir.head:
  %ir = phi i64 [0, %pb.done], [%ir.next, %st.done]
  %ir.more = icmp ult i64 %ir, %mc
  br i1 %ir.more, label %mk.pre, label %ir.done
{_microkernel()}
{_store()}
ir.done:
  %jp.next = add i64 %jp, 1
  br label %jp.head
jp.done:
  %pc.next = add i64 %pc, %kc
  br label %pc.head
pc.done:
  %ic.next = add i64 %ic, %mc
  br label %ic.head
done:
  call void @free(ptr %mem)
  ret void
{_naive()}
}}
"""


def _ceil_div(name: str, a, b) -> str:
    """%name = ceil(a / b) for IR values or constants a, b (b > 0)."""
    return (f"  %{name}.up = add i64 {a}, {b}\n  %{name}.up1 = sub i64 %{name}.up, 1\n"
            f"  %{name} = udiv i64 %{name}.up1, {b}")


def _naive() -> str:
    """No memory for the packed blocks: the panels' columns of C as plain dot products."""
    return f"""naive.pre:
  %nv.j0.0 = mul i64 %lo, {NR}
  %nv.j1.0 = mul i64 %hi, {NR}
  %nv.j1 = call i64 @llvm.umin.i64(i64 %nv.j1.0, i64 %n)
  br label %nv.i
nv.i:
  %nv.row = phi i64 [0, %naive.pre], [%nv.row.next, %nv.i.next]
  %nv.i.more = icmp ult i64 %nv.row, %m
  br i1 %nv.i.more, label %nv.j.pre, label %nv.done
nv.j.pre:
  br label %nv.j
nv.j:
  %nv.col = phi i64 [%nv.j0.0, %nv.j.pre], [%nv.col.next, %nv.j.store]
  %nv.j.more = icmp ult i64 %nv.col, %nv.j1
  br i1 %nv.j.more, label %nv.k.pre, label %nv.i.next
nv.k.pre:
  br label %nv.k
nv.k:
  %nv.kk = phi i64 [0, %nv.k.pre], [%nv.kk.next, %nv.k.body]
  %nv.sum = phi float [0.0, %nv.k.pre], [%nv.sum.next, %nv.k.body]
  %nv.k.more = icmp ult i64 %nv.kk, %k
  br i1 %nv.k.more, label %nv.k.body, label %nv.j.store
nv.k.body:
  %nv.a0 = mul i64 %nv.row, %a_row
  %nv.a1 = mul i64 %nv.kk, %a_col
  %nv.a2 = add i64 %nv.a0, %nv.a1
  %nv.ap = getelementptr float, ptr %a, i64 %nv.a2
  %nv.x = load float, ptr %nv.ap
  %nv.b0 = mul i64 %nv.kk, %ldb
  %nv.b1 = add i64 %nv.b0, %nv.col
  %nv.bp = getelementptr float, ptr %b, i64 %nv.b1
  %nv.y = load float, ptr %nv.bp
  %nv.sum.next = call float @llvm.fma.f32(float %nv.x, float %nv.y, float %nv.sum)
  %nv.kk.next = add i64 %nv.kk, 1
  br label %nv.k
nv.j.store:
  %nv.c0 = mul i64 %nv.row, %ldc
  %nv.c1 = add i64 %nv.c0, %nv.col
  %nv.cp = getelementptr float, ptr %c, i64 %nv.c1
  store float %nv.sum, ptr %nv.cp
  %nv.col.next = add i64 %nv.col, 1
  br label %nv.j
nv.i.next:
  %nv.row.next = add i64 %nv.row, 1
  br label %nv.i
nv.done:
  ret void"""


def _pack_a() -> str:
    """ap[ir / MR][kk][r] = A[ic + ir + r, pc + kk] for the block's rows (0 past M)."""
    lines = ["  br label %pa.head", "pa.head:",
             "  %pa.ir = phi i64 [0, %pc.body], [%pa.ir.next, %pa.kdone]",
             "  %pa.more = icmp ult i64 %pa.ir, %mc",
             "  br i1 %pa.more, label %pa.block, label %pa.done",
             "pa.block:",
             "  %pa.base = mul i64 %pa.ir, %kc",
             "  %pa.first = add i64 %ic, %pa.ir"]
    for r in range(MR):
        lines += [f"  %pa.row{r} = add i64 %pa.first, {r}",
                  f"  %pa.in{r} = icmp ult i64 %pa.row{r}, %m",
                  f"  %pa.rowc{r} = call i64 @llvm.umin.i64(i64 %pa.row{r}, i64 %mlast)",
                  f"  %pa.roff{r} = mul i64 %pa.rowc{r}, %a_row"]
    lines += ["  br label %pa.k", "pa.k:",
              "  %pa.kk = phi i64 [0, %pa.block], [%pa.kk.next, %pa.k]",
              "  %pa.col = add i64 %pc, %pa.kk",
              "  %pa.coff = mul i64 %pa.col, %a_col",
              f"  %pa.dk = mul i64 %pa.kk, {MR}",
              "  %pa.d0 = add i64 %pa.base, %pa.dk"]
    for r in range(MR):
        lines += [f"  %pa.at{r} = add i64 %pa.roff{r}, %pa.coff",
                  f"  %pa.src{r} = getelementptr float, ptr %a, i64 %pa.at{r}",
                  f"  %pa.x{r} = load float, ptr %pa.src{r}",
                  f"  %pa.v{r} = select i1 %pa.in{r}, float %pa.x{r}, float 0.0",
                  f"  %pa.to{r} = add i64 %pa.d0, {r}",
                  f"  %pa.dst{r} = getelementptr float, ptr %ap, i64 %pa.to{r}",
                  f"  store float %pa.v{r}, ptr %pa.dst{r}"]
    lines += ["  %pa.kk.next = add i64 %pa.kk, 1",
              "  %pa.kmore = icmp ult i64 %pa.kk.next, %kc",
              "  br i1 %pa.kmore, label %pa.k, label %pa.kdone",
              "pa.kdone:",
              f"  %pa.ir.next = add i64 %pa.ir, {MR}",
              "  br label %pa.head",
              "pa.done:"]
    return "\n".join(lines)


def _masks() -> str:
    """%mask{v}: the lanes of the tile's v-th vector inside C (all of them but at the last
    panel of a ragged N)."""
    lanes = "<" + ", ".join(f"i64 {i}" for i in range(16)) + ">"
    lines = ["  %nr.v = insertelement <16 x i64> poison, i64 %nr, i64 0",
             "  %nr.s = shufflevector <16 x i64> %nr.v, <16 x i64> poison, <16 x i32> zeroinitializer"]
    for v in range(NV):
        offset = "<" + ", ".join([f"i64 {16 * v}"] * 16) + ">"
        lines += [f"  %lane{v} = add <16 x i64> {lanes}, {offset}",
                  f"  %mask{v} = icmp ult <16 x i64> %lane{v}, %nr.s"]
    return "\n".join(lines)


def _pack_b() -> str:
    """bp[kk][0:NR] = B[pc + kk, j : j + NR] (0 past N)."""
    lines = ["  br label %pb.k", "pb.k:",
             "  %pb.kk = phi i64 [0, %jp.body], [%pb.kk.next, %pb.k]",
             "  %pb.row = add i64 %pc, %pb.kk",
             "  %pb.roff = mul i64 %pb.row, %ldb",
             "  %pb.at = add i64 %pb.roff, %j",
             "  %pb.src = getelementptr float, ptr %b, i64 %pb.at",
             f"  %pb.to = mul i64 %pb.kk, {NR}",
             "  %pb.dst = getelementptr float, ptr %bp, i64 %pb.to"]
    for v in range(NV):
        lines += [f"  %pb.s{v} = getelementptr float, ptr %pb.src, i64 {16 * v}",
                  f"  %pb.x{v} = call {V} @llvm.masked.load.v16f32.p0(ptr %pb.s{v}, i32 4, "
                  f"{MASK} %mask{v}, {V} zeroinitializer)",
                  f"  %pb.d{v} = getelementptr float, ptr %pb.dst, i64 {16 * v}",
                  f"  store {V} %pb.x{v}, ptr %pb.d{v}, align 64"]
    lines += ["  %pb.kk.next = add i64 %pb.kk, 1",
              "  %pb.more = icmp ult i64 %pb.kk.next, %kc",
              "  br i1 %pb.more, label %pb.k, label %pb.done",
              "pb.done:"]
    return "\n".join(lines)


def _microkernel() -> str:
    """The MR x NR tile of sums over this block of K, in registers (%s{r}_{v})."""
    lines = ["mk.pre:",
             "  %mk.a0 = mul i64 %ir, %kc",
             "  %mk.a = getelementptr float, ptr %ap, i64 %mk.a0",
             "  br label %mk", "mk:",
             "  %q = phi i64 [0, %mk.pre], [%q.next, %mk]"]
    for r in range(MR):
        for v in range(NV):
            lines.append(f"  %acc{r}_{v} = phi {V} [zeroinitializer, %mk.pre], [%s{r}_{v}, %mk]")
    lines += [f"  %q.b0 = mul i64 %q, {NR}",
              "  %q.b = getelementptr float, ptr %bp, i64 %q.b0"]
    for v in range(NV):
        lines += [f"  %q.bp{v} = getelementptr float, ptr %q.b, i64 {16 * v}",
                  f"  %b{v} = load {V}, ptr %q.bp{v}, align 64"]
    lines += [f"  %q.a0 = mul i64 %q, {MR}",
              "  %q.a = getelementptr float, ptr %mk.a, i64 %q.a0"]
    for r in range(MR):
        lines += [f"  %q.ap{r} = getelementptr float, ptr %q.a, i64 {r}",
                  f"  %x{r} = load float, ptr %q.ap{r}",
                  f"  %x{r}.v = insertelement {V} poison, float %x{r}, i64 0",
                  f"  %x{r}.s = shufflevector {V} %x{r}.v, {V} poison, <16 x i32> zeroinitializer"]
        for v in range(NV):
            lines.append(f"  %s{r}_{v} = call {V} @llvm.fma.v16f32({V} %x{r}.s, {V} %b{v}, {V} %acc{r}_{v})")
    lines += ["  %q.next = add i64 %q, 1",
              "  %q.more = icmp ult i64 %q.next, %kc",
              "  br i1 %q.more, label %mk, label %st"]
    return "\n".join(lines)


def _store() -> str:
    """C[ic + ir + r, j:j + nr] = the tile's row r (the first block of K) or += it (later ones),
    for the rows inside the block. The first block reads nothing of C: a masked load whose mask
    is all off may still bring its line in."""
    lines = ["st:",
             "  %st.rows0 = sub i64 %mc, %ir",
             f"  %st.rows = call i64 @llvm.umin.i64(i64 %st.rows0, i64 {MR})",
             "  %st.r0 = add i64 %ic, %ir",
             "  br i1 %later, label %add.row0, label %put.row0"]
    for kind in ("put", "add"):
        for r in range(MR):
            last = "st.done" if r == MR - 1 else f"{kind}.row{r + 1}"
            lines += [f"{kind}.row{r}:",
                      f"  %{kind}.in{r} = icmp ult i64 {r}, %st.rows",
                      f"  br i1 %{kind}.in{r}, label %{kind}.go{r}, label %st.done",
                      f"{kind}.go{r}:",
                      f"  %{kind}.row{r}.i = add i64 %st.r0, {r}",
                      f"  %{kind}.off{r}.0 = mul i64 %{kind}.row{r}.i, %ldc",
                      f"  %{kind}.off{r} = add i64 %{kind}.off{r}.0, %j"]
            for v in range(NV):
                at = f"%{kind}.p{r}_{v}"
                lines += [f"  %{kind}.at{r}_{v} = add i64 %{kind}.off{r}, {16 * v}",
                          f"  {at} = getelementptr float, ptr %c, i64 %{kind}.at{r}_{v}"]
                value = f"%s{r}_{v}"
                if kind == "add":
                    lines += [f"  %add.old{r}_{v} = call {V} @llvm.masked.load.v16f32.p0(ptr {at}, "
                              f"i32 4, {MASK} %mask{v}, {V} zeroinitializer)",
                              f"  %add.new{r}_{v} = fadd {V} %add.old{r}_{v}, %s{r}_{v}"]
                    value = f"%add.new{r}_{v}"
                lines.append(f"  call void @llvm.masked.store.v16f32.p0({V} {value}, ptr {at}, i32 4, "
                             f"{MASK} %mask{v})")
            lines.append(f"  br label %{last}")
    lines += ["st.done:",
              f"  %ir.next = add i64 %ir, {MR}",
              "  br label %ir.head"]
    return "\n".join(lines)
