"""A product's BLAS calls dealt out to the kernels' thread pool (threads.py; docs/backends.md,
"Matrix products"): the rows or columns of one product in two parts, or the elements of a batch,
each part a single-threaded call of the CBLAS numpy links (OpenBLAS is held to one thread while a
graph runs: threads.OneBlasThread). codegen.py fills the task's argument block.
"""
from __future__ import annotations

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112    # CBLAS's enums
# BLAS_ARGS: the words of a BLAS call's block (`task`), then per batch axis (`axes` of them,
# outermost first) its size and the strides of A, B and C along it. Split 0 deals out the
# elements of the batch, 1 the rows of C (steps: a row's), 2 its columns (steps: a column's).
BLAS_ARGS = ("trans_a", "trans_b", "m", "n", "k", "a", "lda", "b", "ldb", "c", "ldc", "split",
             "parts", "a_step", "b_step", "c_step", "axes")
POINTER_ARGS = ("a", "b", "c")     # the words of an argument block (here, gemm.py) that are pointers
PARALLEL_BLAS = 1 << 20   # multiply-adds of a product worth the pool (about 20 µs on one core)


def load_words(names) -> str:
    """The IR that loads each word of a task's argument block (%args) into %NAME: a pointer for
    the POINTER_ARGS, else an i64 (codegen.py's `_argument_block` writes the block)."""
    return "\n".join(f"  %{name}.p = getelementptr i64, ptr %args, i64 {i}\n"
                     f"  %{name} = load {'ptr' if name in POINTER_ARGS else 'i64'}, ptr %{name}.p"
                     for i, name in enumerate(names))


def task_name(single: bool) -> str:
    return f"graphc_blas_{'s' if single else 'd'}gemm"


def task(single: bool, blas_int: str) -> str:
    """The BLAS calls of parts [lo, hi) of one product (the thread pool's task signature), one
    call per part: part p is batch element p (split 0: its offsets from the block's axes), or
    the rows (1) or columns (2) from p/parts to (p+1)/parts of C. Run on one core the same parts
    are called in turn, and OpenBLAS runs single-threaded either way while a graph runs
    (threads.OneBlasThread), so results never depend on the thread count (OpenBLAS rounds
    differently on one thread and several, and picks its small-matrix kernels by size)."""
    t = "float" if single else "double"
    loads = load_words(BLAS_ARGS)

    def narrow(name):
        return (f"  %{name}.i = trunc i64 %{name} to {blas_int}" if blas_int != "i64"
                else f"  %{name}.i = add i64 %{name}, 0")
    ints = "\n".join(narrow(name) for name in ("k", "lda", "ldb", "ldc"))
    args = (f"i32 {ROW_MAJOR}, i32 %ta, i32 %tb, {blas_int} %mm.i, {blas_int} %nn.i, "
            f"{blas_int} %k.i, {t} 1.0, ptr %ap, {blas_int} %lda.i, ptr %bp, {blas_int} %ldb.i, "
            f"{t} 0.0, ptr %cp, {blas_int} %ldc.i")
    tail = len(BLAS_ARGS)
    return f"""define internal void @{task_name(single)}(ptr %args, ptr %dims, ptr %status, \
ptr %blas, i64 %lo, i64 %hi) noinline {{
entry:
{loads}
  %fnp = getelementptr ptr, ptr %blas, i64 {0 if single else 1}
  %fn = load ptr, ptr %fnp
  %ta = trunc i64 %trans_a to i32
  %tb = trunc i64 %trans_b to i32
{ints}
  %by.rows = icmp eq i64 %split, 1
  %by.cols = icmp eq i64 %split, 2
  %by.batch = icmp eq i64 %split, 0
  %extent.0 = select i1 %by.cols, i64 %n, i64 %parts
  %extent = select i1 %by.rows, i64 %m, i64 %extent.0
  br label %head
head:
  %p = phi i64 [%lo, %entry], [%p.next, %next]
  %more = icmp ult i64 %p, %hi
  br i1 %more, label %part, label %done
part:
  %x0.0 = mul i64 %p, %extent
  %x0 = udiv i64 %x0.0, %parts
  %p1 = add i64 %p, 1
  %x1.0 = mul i64 %p1, %extent
  %x1 = udiv i64 %x1.0, %parts
  %count = sub i64 %x1, %x0
  %mm = select i1 %by.rows, i64 %count, i64 %m
  %nn = select i1 %by.cols, i64 %count, i64 %n
{narrow("mm")}
{narrow("nn")}
  %ao.0 = mul i64 %x0, %a_step
  %bo.0 = mul i64 %x0, %b_step
  %co.0 = mul i64 %x0, %c_step
  br i1 %by.batch, label %axis.pre, label %offsets
axis.pre:
  br label %axis
axis:
  ; batch element p's offsets: its index along each axis, innermost first
  %ax = phi i64 [%axes, %axis.pre], [%ax.1, %axis.body]
  %rest = phi i64 [%p, %axis.pre], [%rest.1, %axis.body]
  %ao.b = phi i64 [0, %axis.pre], [%ao.b1, %axis.body]
  %bo.b = phi i64 [0, %axis.pre], [%bo.b1, %axis.body]
  %co.b = phi i64 [0, %axis.pre], [%co.b1, %axis.body]
  %ax.any = icmp ugt i64 %ax, 0
  br i1 %ax.any, label %axis.body, label %offsets
axis.body:
  %ax.1 = sub i64 %ax, 1
  %w.0 = mul i64 %ax.1, 4
  %w = add i64 %w.0, {tail}
  %size.p = getelementptr i64, ptr %args, i64 %w
  %size = load i64, ptr %size.p
  %sa.w = add i64 %w, 1
  %sa.p = getelementptr i64, ptr %args, i64 %sa.w
  %sa = load i64, ptr %sa.p
  %sb.w = add i64 %w, 2
  %sb.p = getelementptr i64, ptr %args, i64 %sb.w
  %sb = load i64, ptr %sb.p
  %sc.w = add i64 %w, 3
  %sc.p = getelementptr i64, ptr %args, i64 %sc.w
  %sc = load i64, ptr %sc.p
  %index = urem i64 %rest, %size
  %rest.1 = udiv i64 %rest, %size
  %ao.s = mul i64 %index, %sa
  %ao.b1 = add i64 %ao.b, %ao.s
  %bo.s = mul i64 %index, %sb
  %bo.b1 = add i64 %bo.b, %bo.s
  %co.s = mul i64 %index, %sc
  %co.b1 = add i64 %co.b, %co.s
  br label %axis
offsets:
  %ao.1 = phi i64 [%ao.0, %part], [%ao.b, %axis]
  %bo.1 = phi i64 [%bo.0, %part], [%bo.b, %axis]
  %co.1 = phi i64 [%co.0, %part], [%co.b, %axis]
  %ap = getelementptr {t}, ptr %a, i64 %ao.1
  %bp = getelementptr {t}, ptr %b, i64 %bo.1
  %cp = getelementptr {t}, ptr %c, i64 %co.1
  %any = icmp ugt i64 %count, 0
  br i1 %any, label %call, label %next
call:
  call void %fn({args})
  br label %next
next:
  %p.next = add i64 %p, 1
  br label %head
done:
  ret void
}}
"""
