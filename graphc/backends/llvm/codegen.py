"""Renders the kernel plans of a program's graphs as one LLVM module: a function per distinct
kernel (graphs share many: `evaluate` repeats `forward`) and a `graph_main_KEY` per graph, which
runs its kernels in order. The text is meant to be read (`graphc build --backend llvm
--emit-source DIR`). Over 500 lines on purpose: every kernel form (loop nests, reductions, the
BLAS calls of plain and batched products) is rendered here, beside the Function it writes.

graph_main_KEY(ptr bufs, ptr dims, ptr blas, ptr status) -> i32: `bufs` holds a pointer per buffer
of the plan, `dims` the symbolic sizes (in plan.symbols order), `blas` the addresses of sgemm and
dgemm (or null), and `status` three i64 words that a failing check fills (code, value, the index
of the kernel that failed). Built `timed` (`graphc time`), graph_main stores the cycle counter
before and after each kernel from status[3] on, and `graphc_ticks` reads it for the host.
Over 500 lines: the module, the products' three paths and the loop nest share Function's naming.
"""
from __future__ import annotations

import hashlib
import platform
import re

from graphc.backends.kernels.ir import (
    ONE,
    ZERO,
    Access,
    Const,
    FlatIndex,
    Index,
    Kernel,
    KernelPlan,
    Load,
    Op,
    SizeOf,
    Store,
    coalesce,
    memory_order,
    smul,
    sprod,
    sstr,
    walk,
)
from graphc.backends.kernels.tables import render_failure
from graphc.backends.llvm import blas, gemm, threads
from graphc.backends.llvm.blas import NO_TRANS, TRANS
from graphc.backends.llvm.lowering import IR_TYPE, LOWER, MEM_TYPE, REDUCE_FLAGS, SUFFIX, cast, const
from graphc.ir.types import DType

# Below this many multiply-adds a generated loop beats the call into the BLAS.
SMALL_GEMM = 32 * 32 * 32
THIN_GEMM = 4
LOOP_ID = "LOOPID"          # where a kernel's loop metadata number goes
SHORT_LOOP_ID = "LOOPSHORTID"   # ... and that of its short kept loops that are vectorized anyway
TINY_TRIP_COUNT = 16        # LLVM's vectorizer leaves loops of fewer iterations alone unless told


def _comment(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_#@.,:()\[\] *+=-]", "?", text)


class Function:
    """An LLVM function being written: fresh names, the current block, and declarations used."""

    def __init__(self, module: Module, name: str):
        self.module, self.name = module, name
        self.lines: list[str] = []
        self.counter = 0
        self.block = "entry"
        self.checked = False

    def fresh(self, hint: str = "v") -> str:
        self.counter += 1
        return f"%{hint}{self.counter}"

    def emit(self, instr: str, hint: str = "v") -> str:
        name = self.fresh(hint)
        self.lines.append(f"  {name} = {instr}")
        return name

    def do(self, instr: str) -> None:
        self.lines.append(f"  {instr}")

    def label(self, name: str) -> None:
        self.lines.append(f"{name}:")
        self.block = name

    def call(self, fn: str, ret: str, args: list[tuple[str, str]]) -> str:
        self.module.declare(fn, ret, [t for t, _ in args])
        return self.emit(f"call {ret} @{fn}({', '.join(f'{t} {v}' for t, v in args)})")

    def check_label(self, label: str, cls: str, depth: int) -> None:
        """one_hot: record a label outside [0, depth) (checked once per row, at class 0)."""
        self.checked = True
        bad = self.emit(f"icmp uge i64 {label}, {depth}")
        first = self.emit(f"icmp eq i64 {cls}, 0")
        report = self.emit(f"and i1 {bad}, {first}")
        fail, ok = self.fresh("bad").lstrip("%"), self.fresh("ok").lstrip("%")
        self.do(f"br i1 {report}, label %{fail}, label %{ok}")
        self.label(fail)
        self.do("store i64 1, ptr %status")
        self.do(f"store i64 {label}, ptr {self.emit('getelementptr i64, ptr %status, i64 1')}")
        self.do(f"br label %{ok}")
        self.label(ok)


class Module:
    def __init__(self, blas_int_bits: int, timed: bool = False):
        self.blas_int = f"i{blas_int_bits}"
        self.timed = timed
        self.declarations: dict[str, str] = {}
        self.functions: dict[str, str] = {}      # kernel name -> text; equal kernels once
        self.mains: list[str] = []
        self.plan: KernelPlan | None = None
        self.args: dict[int, str] = {}           # buffer -> its parameter in the current kernel
        self.uses_gemm = False                   # a kernel calls gemm.py's graphc_sgemm
        self.blas_tasks: set[bool] = set()       # ... its BLAS task (True: the f32 one)

    def declare(self, fn: str, ret: str, types: list[str]) -> None:
        self.declarations.setdefault(fn, f"declare {ret} @{fn}({', '.join(types)})")

    def ptr(self, buffer: int) -> str:
        return self.args[self.resolve(buffer)]

    def size(self, f: Function, s, cache: dict) -> str:
        """The IR value of a size monomial (symbols loaded from %dims)."""
        if not s[1]:
            return str(s[0])
        if s in cache:
            return cache[s]
        value = None
        for sym in s[1]:
            if sym not in cache:
                slot = self.plan.symbols.index(sym)
                ptr = f.emit(f"getelementptr i64, ptr %dims, i64 {slot}")
                cache[sym] = f.emit(f"load i64, ptr {ptr}", "d")
            value = cache[sym] if value is None else f.emit(f"mul i64 {value}, {cache[sym]}")
        if s[0] != 1:
            value = f.emit(f"mul i64 {value}, {s[0]}")
        cache[s] = value
        return value

    # --- kernels --------------------------------------------------------------------------------

    def render_kernel(self, kernel: Kernel) -> tuple[str, list[int], bool, tuple | None]:
        """(the kernel's function name, the buffers it takes in order, whether it checks, and
        for a kernel that takes a range of its outer loop (threads.py): (the outer loop's
        count, the kernel's points) as sizes, else None)."""
        kernel = coalesce(memory_order(kernel))
        buffers = sorted({self.resolve(a.buffer) for a in kernel.loads}
                         | {self.resolve(s.access.buffer) for s in kernel.stores})
        self.args = {b: f"%arg{i}" for i, b in enumerate(buffers)}
        f = Function(self, kernel.name)
        split = threads.splittable(kernel, self.resolve)
        params = "".join(f"ptr noalias %arg{i}, " for i in range(len(buffers)))
        header = (f"; {_comment(kernel.label)}: space [{', '.join(sstr(s) for s in kernel.space)}]"
                  + (f", reduce {list(kernel.reduce_axes)}" if kernel.reduce_axes else ""))
        sizes: dict = {}
        # Every size the kernel needs is computed once, in the entry block, which dominates all uses.
        for s in _sizes_used(self.plan, kernel):
            self.size(f, s, sizes)
        space = [self.size(f, s, sizes) for s in kernel.space]
        if kernel.matmul is None or not self._blas_call(f, kernel, space, sizes):
            LoopNest(self, f, kernel, space, sizes, split).render()
        f.do("ret void")
        # noinline: each kernel is optimized and emitted once, not again inside every graph_main.
        body = (f"({params}ptr %dims, ptr %status, ptr %blas{', i64 %lo, i64 %hi' if split else ''}) "
                "noinline {\nentry:\n" + "\n".join(f.lines) + "\n}\n")
        # Named by content, so a kernel that several graphs share is compiled once.
        digest = hashlib.sha1(body.encode()).hexdigest()
        name = f"{kernel.name.split('_', 1)[-1]}_{digest[:10]}"
        text = f"{header}\ndefine internal void @{name}{body}"
        if LOOP_ID in body:       # the loop metadata, numbered by content too
            number = str(int(digest[:7], 16))
            text = (text.replace(LOOP_ID, number)
                    + f'!{number} = distinct !{{!{number}, !{{!"llvm.loop.unroll.disable"}}}}\n')
        if SHORT_LOOP_ID in body:
            number = str(int(digest[7:14], 16))
            text = (text.replace(SHORT_LOOP_ID, number)
                    + f'!{number} = distinct !{{!{number}, !{{!"llvm.loop.unroll.disable"}}, '
                    f'!{{!"llvm.loop.vectorize.enable", i1 true}}}}\n')
        self.functions.setdefault(name, text)
        return name, buffers, f.checked, (kernel.space[0], sprod(kernel.space)) if split else None

    def resolve(self, buffer: int) -> int:
        return self.plan.aliases.get(buffer, buffer)

    def _blas_call(self, f: Function, kernel: Kernel, space: list[str], sizes: dict) -> bool:
        """C = A @ B when both operands are plain or transposed matrices: the generated loop for
        small products (the call costs more than the work there), graphc's GEMM for short, wide
        f32 ones (gemm.py), else the BLAS, its calls dealt out to the thread pool (blas.task:
        a product's rows or columns in two parts, a batch's elements). A batched product
        ([..., M, K] @ [..., K, N], attention's heads) first folds batch axes along which B stays
        put into M (a layer over a sequence is one GEMM over all its rows), then calls the GEMM
        once per remaining batch element."""
        original, kernel = kernel, _rows_merged(kernel)
        a, b = kernel.loads
        out = kernel.stores[0].access
        dtype = kernel.stores[0].expr.dtype
        nb = len(kernel.space) - 3
        if dtype not in (DType.f32, DType.f64) or out.strides[nb + 1][0] != 0:
            return False
        m, k, n = kernel.space[nb:]
        sa, sb = a.strides[nb:], b.strides[nb:]
        # (each operand's leading dimension: its row stride, its row length, its row count)
        if sa[1] == ONE:
            trans_a, lda_of = NO_TRANS, (sa[0], k, m)
        elif sa[0] == ONE:
            trans_a, lda_of = TRANS, (sa[1], m, k)
        else:
            return False
        if sb[2] == ONE:
            trans_b, ldb_of = NO_TRANS, (sb[1], n, k)
        elif sb[1] == ONE:
            trans_b, ldb_of = TRANS, (sb[2], k, n)
        else:
            return False
        if out.strides[nb + 2] != ONE or out.offset or out.strides[nb] != n:
            return False
        t = IR_TYPE[dtype]
        # Every size the calls need, here in the entry block, which dominates the loop below.
        mkn_sizes = [self.size(f, x, sizes) for x in (m, k, n)]
        batch = [self.size(f, x, sizes) for x in kernel.space[:nb]]
        strides = [[self.size(f, acc.strides[i], sizes) for i in range(nb)] for acc in (a, b, out)]
        mkn = f.emit(f"mul i64 {f.emit(f'mul i64 {mkn_sizes[0]}, {mkn_sizes[1]}')}, {mkn_sizes[2]}")
        # Few multiply-adds, or a product with a single row (a batch of one) or a tiny inner
        # dimension: the generated loop streams B once and beats the BLAS call.
        tiny = f.emit(f"icmp ule i64 {mkn}, {SMALL_GEMM}")
        shortest = f.emit(f"call i64 @llvm.umin.i64(i64 {mkn_sizes[0]}, i64 {mkn_sizes[1]})")
        thin = f.emit(f"icmp ule i64 {shortest}, {THIN_GEMM}")
        self.declare("llvm.umin.i64", "i64", ["i64", "i64"])
        slot = 0 if dtype is DType.f32 else 1
        fn = f.emit(f"load ptr, ptr {f.emit(f'getelementptr ptr, ptr %blas, i64 {slot}')}")
        no_blas = f.emit(f"icmp eq ptr {fn}, null")      # numpy links no CBLAS graphc could find

        def ld(triple):
            """The leading dimension, and whether the rows overlap: a row stride shorter than a
            row (a broadcast or window view) over more than one row is no matrix a BLAS reads
            (the loop below takes it); one row may have any stride."""
            stride, inner, rows = (self.size(f, x, sizes) for x in triple)
            value = f.emit(f"call i64 @llvm.umax.i64(i64 {stride}, i64 {inner})")
            value = f.emit(f"call i64 @llvm.umax.i64(i64 {value}, i64 1)")
            overlap = f.emit(f"and i1 {f.emit(f'icmp ult i64 {stride}, {inner}')}, "
                             f"{f.emit(f'icmp ugt i64 {rows}, 1')}")
            return value, overlap
        self.declare("llvm.umax.i64", "i64", ["i64", "i64"])
        (lda, overlap_a), (ldb, overlap_b) = ld(lda_of), ld(ldb_of)
        bases = []
        for acc in (a, b, out):
            ptr = self.ptr(acc.buffer)
            bases.append(f.emit(f"getelementptr {t}, ptr {ptr}, i64 {self.offset(f, acc.offset, sizes)}")
                         if acc.offset else ptr)
        # The parts the BLAS task calls: a batch's elements (its axes in the block's tail), or
        # one product's rows or columns (whichever of M and N is longer) in two halves, as for a
        # batch of exactly one element.
        words = dict(trans_a=str(trans_a), trans_b=str(trans_b), m=mkn_sizes[0], n=mkn_sizes[2],
                     k=mkn_sizes[1], a=bases[0], lda=lda, b=bases[1], ldb=ldb, c=bases[2],
                     ldc=mkn_sizes[2], axes=str(nb))
        rows = f.emit(f"icmp uge i64 {mkn_sizes[0]}, {mkn_sizes[2]}")
        a_row = lda if trans_a == NO_TRANS else "1"
        b_col = "1" if trans_b == NO_TRANS else ldb
        halves = dict(split=f.emit(f"select i1 {rows}, i64 1, i64 2"), parts="2",
                      a_step=f.emit(f"select i1 {rows}, i64 {a_row}, i64 0"),
                      b_step=f.emit(f"select i1 {rows}, i64 0, i64 {b_col}"),
                      c_step=f.emit(f"select i1 {rows}, i64 {mkn_sizes[2]}, i64 1"))
        if nb:
            elements = self.size(f, sprod(kernel.space[:nb]), sizes)
            one = f.emit(f"icmp eq i64 {elements}, 1")
            words.update({name: f.emit(f"select i1 {one}, i64 {halves[name]}, i64 {batched}")
                          for name, batched in (("split", "0"), ("parts", elements), ("a_step", "0"),
                                                ("b_step", "0"), ("c_step", "0"))})
            tail = [x for i in range(nb) for x in (batch[i], *(strides[j][i] for j in range(3)))]
            work = f.emit(f"mul i64 {mkn}, {elements}")
        else:
            words.update(halves)
            tail, work = [], mkn
        if dtype is DType.f32 and not nb and trans_b == NO_TRANS and gemm.wanted():
            self._generated_gemm(f, (sa[0], sa[1], sb[1]), bases, mkn_sizes, sizes,
                                 f.emit(f"or i1 {tiny}, {thin}"))
        small = f.emit(f"or i1 {f.emit(f'or i1 {tiny}, {thin}')}, {no_blas}")
        small = f.emit(f"or i1 {small}, {f.emit(f'or i1 {overlap_a}, {overlap_b}')}")
        f.do(f"br i1 {small}, label %small_gemm, label %call_blas")
        f.label("call_blas")
        self._blas_on_pool(f, dtype, words, tail, work)
        f.label("small_gemm")
        LoopNest(self, f, original, space, sizes).render()
        return True

    def _blas_on_pool(self, f: Function, dtype: DType, words: dict, tail: list, work: str) -> None:
        """The BLAS calls of a product through blas.py's task, on both cores when the product is
        large and the host gave a pool, else here: its arguments in a block of words
        (blas.BLAS_ARGS, then each batch axis's size and strides)."""
        block = self._argument_block(f, "blas.args", [words[name] for name in blas.BLAS_ARGS] + tail,
                                     blas.BLAS_ARGS)
        task = blas.task_name(dtype is DType.f32)
        self.blas_tasks.add(dtype is DType.f32)
        pool = f.emit(f"load ptr, ptr {f.emit('getelementptr ptr, ptr %blas, i64 2')}")
        big = f.emit(f"icmp uge i64 {work}, {blas.PARALLEL_BLAS}")
        go = f.emit(f"and i1 {big}, {f.emit(f'icmp ne ptr {pool}, null')}")
        f.do(f"br i1 {go}, label %blas_pool, label %blas_here")
        f.label("blas_pool")
        f.do(f"call void @graphc_parallel(ptr {pool}, ptr @{task}, ptr {block}, ptr null, ptr null, "
             f"ptr %blas, i64 {words['parts']})")
        f.do("ret void")
        f.label("blas_here")
        f.do(f"call void @{task}(ptr {block}, ptr null, ptr null, ptr %blas, i64 0, i64 {words['parts']})")
        f.do("ret void")

    @staticmethod
    def _argument_block(f: Function, name: str, values: list[str], names: tuple) -> str:
        """A block of i64 words on the kernel's stack holding `values` (the first len(names) of
        them named, the rest i64s) for a task that reads it with `blas.load_words(names)`."""
        block = f"%{name}"
        f.lines.insert(0, f"  {block} = alloca [{len(values)} x i64], align 8")
        for i, value in enumerate(values):
            pointer = i < len(names) and names[i] in blas.POINTER_ARGS
            slot = f.emit(f"getelementptr i64, ptr {block}, i64 {i}")
            f.do(f"store {'ptr' if pointer else 'i64'} {value}, ptr {slot}")
        return block

    def _generated_gemm(self, f: Function, strides: tuple, bases: list[str], mkn: list[str],
                        sizes: dict, small: str) -> None:
        """Branch to gemm.py's kernel for a product it takes (an f32 C = A @ B, B's rows
        contiguous along N) where gemm.profitable (or GRAPHC_GEMM=generated) says so and the
        product is not small: its operands go in an argument block, and the kernel returns."""
        m, k, n = mkn
        a_row, a_col, ldb = (self.size(f, s, sizes) for s in strides)
        use = f.emit(f"xor i1 {small}, true")
        if gemm.mode() == "auto":
            use = f.emit(f"and i1 {use}, {gemm.profitable(f.emit, m, k, n)}")
        f.do(f"br i1 {use}, label %generated_gemm, label %other_gemm")
        f.label("generated_gemm")
        values = dict(zip(("a", "b", "c"), bases), m=m, n=n, k=k, a_row=a_row, a_col=a_col, ldb=ldb,
                      ldc=n)
        block = self._argument_block(f, "gemm.args", [values[name] for name in gemm.ARGS], gemm.ARGS)
        f.do(f"call void @graphc_sgemm(ptr {block}, ptr %blas)")
        f.do("ret void")
        f.label("other_gemm")
        self.uses_gemm = True

    def offset(self, f: Function, offset, sizes: dict) -> str:
        total = None
        for term in offset:
            v = self.size(f, term, sizes)
            total = v if total is None else f.emit(f"add i64 {total}, {v}")
        return total or "0"

    # --- the module -----------------------------------------------------------------------------

    def render_graph(self, key: str, plan: KernelPlan) -> None:
        """Add `graph_main_KEY`, running the kernels of `plan` in order."""
        self.plan = plan
        calls = [self.render_kernel(kernel) for kernel in plan.kernels]
        main = Function(self, f"graph_main_{key}")
        for b in sorted({b for _, bufs, _, _ in calls for b in bufs}):
            ptr = main.emit(f"getelementptr ptr, ptr %bufs, i64 {b}")
            main.lines.append(f"  %b{b} = load ptr, ptr {ptr}")
        failures = []
        if self.timed:
            self._tick(main, 0)
        sizes: dict = {}
        for index, (name, buffers, checks, split) in enumerate(calls):
            args = "".join(f"ptr %b{b}, " for b in buffers)
            if split:
                self._dispatch(main, name, buffers, split, sizes)
            else:
                main.do(f"call void @{name}({args}ptr %dims, ptr %status, ptr %blas)")
            if self.timed:
                self._tick(main, index + 1)
            if checks:        # stop at a failed check: nothing later may run
                code = main.emit("load i64, ptr %status")
                failed = main.emit(f"icmp ne i64 {code}, 0")
                fail, cont = main.fresh("fail").lstrip("%"), main.fresh("cont").lstrip("%")
                main.do(f"br i1 {failed}, label %{fail}, label %{cont}")
                failures.append((fail, index))
                main.label(cont)
        main.do("ret i32 0")
        for fail, index in failures:
            main.label(fail)
            main.do(f"store i64 {index}, ptr {main.emit('getelementptr i64, ptr %status, i64 2')}")
            main.do("ret i32 1")
        head = [f"; graph {_comment(plan.name)} ({key}): {len(plan.kernels)} kernels, "
                f"{len(plan.buffers)} buffers; symbols: {', '.join(plan.symbols) or 'none'}"]
        for buf in plan.buffers:
            where = f" -> b{plan.aliases[buf.id]} (in place)" if buf.id in plan.aliases else ""
            head.append(f";   b{buf.id}: {buf.kind} {_comment(buf.name or '')} {buf.dtype}"
                        f"[{', '.join(sstr(s) for s in buf.shape)}]{where}")
        self.mains.append("\n".join(head) + f"\ndefine i32 @graph_main_{key}(ptr %bufs, ptr %dims, "
                          "ptr %blas, ptr %status) {\nentry:\n" + "\n".join(main.lines) + "\n}\n")

    def _dispatch(self, main: Function, kernel: str, buffers: list[int], split: tuple, sizes) -> None:
        """A call of a kernel that takes a range of its outer loop: on both cores through
        graphc_parallel when it is large and the host gave a pool, else the whole range here."""
        count, points = (self.size(main, s, sizes) for s in split)
        task = f"task_{kernel}_{'_'.join(map(str, buffers))}"
        self.functions.setdefault(task, threads.task(task, kernel, buffers))
        big = main.emit(f"icmp uge i64 {points}, {threads.MIN_POINTS}")
        pool = main.emit(f"load ptr, ptr {main.emit('getelementptr ptr, ptr %blas, i64 2')}")
        go = main.emit(f"and i1 {big}, {main.emit(f'icmp ne ptr {pool}, null')}")
        par, ser, done = (main.fresh(h).lstrip("%") for h in ("par", "ser", "next"))
        main.do(f"br i1 {go}, label %{par}, label %{ser}")
        main.label(par)
        main.do(f"call void @graphc_parallel(ptr {pool}, ptr @{task}, ptr %bufs, ptr %dims, "
                f"ptr %status, ptr %blas, i64 {count})")
        main.do(f"br label %{done}")
        main.label(ser)
        args = "".join(f"ptr %b{b}, " for b in buffers)
        main.do(f"call void @{kernel}({args}ptr %dims, ptr %status, ptr %blas, i64 0, i64 {count})")
        main.do(f"br label %{done}")
        main.label(done)

    def _tick(self, main: Function, slot: int) -> None:
        """status[3 + slot] = the cycle counter now (a timed module)."""
        now = main.call("llvm.readcyclecounter", "i64", [])
        main.do(f"store i64 {now}, ptr {main.emit(f'getelementptr i64, ptr %status, i64 {3 + slot}')}")

    def text(self) -> str:
        return "\n".join(["; graphc: generated LLVM IR", ""] + sorted(self.declarations.values())
                         + [""] + list(self.functions.values()) + self.mains)


class LoopNest:
    """The loops of one kernel. Reductions over trailing axes accumulate in registers; others
    accumulate into the output, which is first filled with the reduction's identity."""

    def __init__(self, module: Module, f: Function, kernel: Kernel, space: list[str], sizes: dict,
                 split: bool = False):
        """`split`: the outer loop runs over [%lo, %hi) (threads.py)."""
        self.m, self.f, self.k = module, f, kernel
        self.split = split
        self.space, self.sizes = space, sizes
        rank = len(kernel.space)
        suffix = rank
        while suffix > 0 and (suffix - 1) in kernel.reduce_axes:
            suffix -= 1
        self.register_from = suffix if all(a >= suffix for a in kernel.reduce_axes) else None
        self.index: list[str] = []
        self.memo: dict = {}
        self.accs: dict[int, str] = {}

    def render(self) -> None:
        f, k = self.f, self.k
        reducing = [s for s in k.stores if s.reduce]
        if reducing and self.register_from is None:
            for s in reducing:
                self.fill(s)
        if reducing and self.register_from is not None:
            for i, s in enumerate(reducing):
                self.accs[i] = f"%acc{i}"
                f.lines.insert(0, f"  %acc{i} = alloca {IR_TYPE[s.expr.dtype]}")
        self.loop(0)
        if reducing and self.register_from is None:
            for s in reducing:
                if s.reduce == "mean":
                    self.scale(s)

    # --- loops -----------------------------------------------------------------------------------

    def loop(self, axis: int) -> None:
        k = self.k
        if axis == self.register_from:
            self.init_accumulators()
        if axis == len(k.space):
            self.body()
        else:
            # The innermost loop (or the last kept axis, before reduced ones or a scatter's window
            # offsets of known counts) of
            # a known count of 8 or more is not unrolled: fully unrolled, the loop around it
            # would be vectorized instead, with gathers (col2im, im2col, pooling).
            count = self.space[axis]
            inner = axis == len(k.space) - 1 or (
                (self.register_from == axis + 1 or len(k.space) - k.window_axes == axis + 1)
                and all(self.space[a].isdigit() for a in range(axis + 1, len(k.space))))
            whole = inner and count.isdigit() and int(count) >= 8
            # A kept axis (each point its own result) of fewer iterations than the vectorizer
            # takes on by itself is vectorized on request: the 12 windows of a pooled row, whose
            # 2x2 offsets are unrolled inside (max-pooling and its gradient).
            short = whole and int(count) < TINY_TRIP_COUNT and axis not in k.reduce_axes
            bounds = ("%lo", "%hi") if axis == 0 and self.split else ("0", count)
            self.for_range(bounds[1], lambda i: (self.index.append(i), self.loop(axis + 1),
                                                 self.index.pop()), f"i{axis}_", whole, bounds[0],
                           short)
        if axis == self.register_from:
            self.finish_accumulators()

    def for_range(self, count: str, body, hint: str, whole: bool = False, start: str = "0",
                  short: bool = False) -> None:
        """A counted loop from `start` to `count`; `whole`: kept a loop (not unrolled), so the
        vectorizer sees it; `short`: and vectorized although its count is small."""
        f = self.f
        head, latch, done = (f.fresh(hint + n).lstrip("%") for n in ("loop", "latch", "done"))
        pre = f.block
        nonempty = f.emit(f"icmp slt i64 {start}, {count}")
        f.do(f"br i1 {nonempty}, label %{head}, label %{done}")
        f.label(head)
        i = f.fresh(hint)
        f.lines.append(f"  {i} = phi i64 [{start}, %{pre}], [{i}.next, %{latch}]")
        body(i)
        f.do(f"br label %{latch}")
        f.label(latch)
        f.lines.append(f"  {i}.next = add nuw nsw i64 {i}, 1")
        more = f.emit(f"icmp slt i64 {i}.next, {count}")
        loop_id = SHORT_LOOP_ID if short else LOOP_ID
        f.do(f"br i1 {more}, label %{head}, label %{done}" + (f", !llvm.loop !{loop_id}" if whole else ""))
        f.label(done)

    # --- values ----------------------------------------------------------------------------------

    def address(self, access, dtype: DType, index: list[str]) -> str:
        f = self.f
        pos = self.m.offset(f, access.offset, self.sizes) if access.offset else None
        for i, stride in zip(index, access.strides):
            if stride[0] == 0:
                continue
            term = i if stride == ONE else f.emit(f"mul i64 {i}, {self.m.size(f, stride, self.sizes)}")
            pos = term if pos is None else f.emit(f"add i64 {pos}, {term}")
        ptr = self.m.ptr(access.buffer)
        return f.emit(f"getelementptr {MEM_TYPE[dtype]}, ptr {ptr}, i64 {pos or 0}", "p")

    def load(self, access, dtype: DType, index: list[str]) -> str:
        value = self.f.emit(f"load {MEM_TYPE[dtype]}, ptr {self.address(access, dtype, index)}")
        return self.f.emit(f"trunc i8 {value} to i1") if dtype is DType.bool else value

    def store(self, access, dtype: DType, value: str, index: list[str]) -> None:
        if dtype is DType.bool:
            value = self.f.emit(f"zext i1 {value} to i8")
        self.f.do(f"store {MEM_TYPE[dtype]} {value}, ptr {self.address(access, dtype, index)}")

    def expr(self, e) -> str:
        if e in self.memo:
            return self.memo[e]
        f = self.f
        if isinstance(e, Load):
            v = self.load(self.k.loads[e.access], e.dtype, self.index)
        elif isinstance(e, Const):
            v = const(e.value, e.dtype)
        elif isinstance(e, SizeOf):
            v = cast(f, self.m.size(f, e.size, self.sizes), DType.i64, e.dtype)
        elif isinstance(e, Index):
            v = self.index[e.axis]
        elif isinstance(e, FlatIndex):
            v = None
            for i, s in zip(self.index, self.space):
                v = i if v is None else f.emit(f"add i64 {f.emit(f'mul i64 {v}, {s}')}, {i}")
            v = v or "0"
        else:
            assert isinstance(e, Op), f"internal error: unknown expression {e}"
            args = [self.expr(a) for a in e.args]
            dts = [_dtype(a) for a in e.args]
            try:
                v = LOWER[e.op](f, args, dts, e.attr, e.dtype)
            except KeyError as err:     # no entry for the op, or none of its types for a dtype
                raise render_failure("llvm", e.op, e.dtype, dts, self.k.name) from err
        self.memo[e] = v
        return v

    # --- reductions ------------------------------------------------------------------------------

    def identity(self, store) -> str:
        dtype = store.expr.dtype
        if store.reduce == "max":
            if dtype.is_float:
                return const(float("-inf"), dtype)
            return str(-(1 << 63) if dtype is DType.i64 else -(1 << 31))
        return const(0, dtype)

    def combine(self, store, acc: str, value: str) -> str:
        dtype = store.expr.dtype
        t = IR_TYPE[dtype]
        if store.reduce == "max":
            name = f"llvm.maximum.{SUFFIX[dtype]}" if dtype.is_float else f"llvm.smax.{SUFFIX[dtype]}"
            return self.f.call(name, t, [(t, acc), (t, value)])
        if dtype.is_float:
            return self.f.emit(f"fadd {REDUCE_FLAGS} {t} {acc}, {value}")
        return self.f.emit(f"add {t} {acc}, {value}")

    def reduced_count(self) -> str:
        return self.m.size(self.f, sprod(self.k.space[a] for a in self.k.reduce_axes), self.sizes)

    def init_accumulators(self) -> None:
        for i, s in enumerate(s for s in self.k.stores if s.reduce):
            self.f.do(f"store {IR_TYPE[s.expr.dtype]} {self.identity(s)}, ptr {self.accs[i]}")

    def finish_accumulators(self) -> None:
        f = self.f
        for i, s in enumerate(s for s in self.k.stores if s.reduce):
            t = IR_TYPE[s.expr.dtype]
            value = f.emit(f"load {t}, ptr {self.accs[i]}")
            if s.reduce == "mean":
                count = cast(f, self.reduced_count(), DType.i64, s.expr.dtype)
                value = f.emit(f"fdiv {t} {value}, {count}")
            index = self.index + ["0"] * (len(self.k.space) - len(self.index))
            self.store(s.access, s.expr.dtype, value, index)

    def body(self) -> None:
        self.memo = {}
        reducing = 0
        for s in self.k.stores:
            value = self.expr(s.expr)
            if not s.reduce:
                self.store(s.access, s.expr.dtype, value, self.index)
            elif self.register_from is not None:
                t = IR_TYPE[s.expr.dtype]
                acc = self.f.emit(f"load {t}, ptr {self.accs[reducing]}")
                self.f.do(f"store {t} {self.combine(s, acc, value)}, ptr {self.accs[reducing]}")
                reducing += 1
            else:
                old = self.load(s.access, s.expr.dtype, self.index)
                self.store(s.access, s.expr.dtype, self.combine(s, old, value), self.index)

    def _flat(self, store, body) -> None:
        buf = self.m.plan.buffers[store.access.buffer]
        count = self.m.size(self.f, buf.elements, self.sizes)
        self.for_range(count, body, "j")

    def fill(self, store) -> None:
        dtype = store.expr.dtype
        ptr = self.m.ptr(store.access.buffer)

        def body(j):
            p = self.f.emit(f"getelementptr {MEM_TYPE[dtype]}, ptr {ptr}, i64 {j}", "p")
            self.f.do(f"store {MEM_TYPE[dtype]} {self.identity(store)}, ptr {p}")
        self._flat(store, body)

    def scale(self, store) -> None:
        f, dtype = self.f, store.expr.dtype
        t = IR_TYPE[dtype]
        ptr = self.m.ptr(store.access.buffer)
        count = cast(f, self.reduced_count(), DType.i64, dtype)

        def body(j):
            p = f.emit(f"getelementptr {t}, ptr {ptr}, i64 {j}", "p")
            old = f.emit(f"load {t}, ptr {p}")
            f.do(f"store {t} {f.emit(f'fdiv {t} {old}, {count}')}, ptr {p}")
        self._flat(store, body)


def _rows_merged(kernel: Kernel) -> Kernel:
    """A matrix-product kernel whose batch axes just before M, along which B does not move and A
    (untransposed) and C run on row after row, folded into M: [N, T, K] @ [K, M] is one GEMM of
    N*T rows."""
    nb = len(kernel.space) - 3
    a, b = kernel.loads
    out = kernel.stores[0].access
    space, sa, sb, so = list(kernel.space), list(a.strides), list(b.strides), list(out.strides)
    while nb and sb[nb - 1] == ZERO and sa[nb + 1] == ONE \
            and sa[nb - 1] == smul(sa[nb], space[nb]) and so[nb - 1] == smul(so[nb], space[nb]):
        space[nb] = smul(space[nb - 1], space[nb])
        for strides in (sa, sb, so):
            del strides[nb - 1]
        del space[nb - 1]
        nb -= 1
    if nb == len(kernel.space) - 3:
        return kernel
    store = kernel.stores[0]
    return Kernel(kernel.name, tuple(space), (nb + 1,),
                  [Access(a.buffer, tuple(sa), a.offset), Access(b.buffer, tuple(sb), b.offset)],
                  [Store(Access(out.buffer, tuple(so), out.offset), store.expr, store.reduce, store.node)],
                  kernel.nodes, kernel.matmul)


def _sizes_used(plan: KernelPlan, kernel: Kernel) -> list:
    out = list(kernel.space)
    for a in list(kernel.loads) + [s.access for s in kernel.stores]:
        out.extend(a.strides)
        out.extend(a.offset)
    out.append(sprod(kernel.space[a] for a in kernel.reduce_axes))
    out.extend(plan.buffers[s.access.buffer].elements for s in kernel.stores if s.reduce)
    out.extend(e.size for e in walk(s.expr for s in kernel.stores) if isinstance(e, SizeOf))
    if kernel.matmul is not None:       # the folded rows of a batched product (_rows_merged)
        merged = _rows_merged(kernel)
        out.extend(merged.space)
        out.extend(x for acc in list(merged.loads) + [merged.stores[0].access] for x in acc.strides)
    return [s for s in out if s[1]]


def _dtype(e) -> DType:
    if isinstance(e, (Index, FlatIndex)):
        return DType.i64
    return e.dtype


def build_module(plans: dict[str, KernelPlan], blas_int_bits: int = 64, timed: bool = False) -> Module:
    """One module for the graphs of a program: `graph_main_KEY` for each plan (timed: reading
    the cycle counter around every kernel, see the module's docstring)."""
    module = Module(blas_int_bits, timed)
    for key, plan in plans.items():
        module.render_graph(key, plan)
    pause = platform.machine().lower() in ("x86_64", "amd64")
    functions, worker = threads.helpers(pause)
    module.functions.update(functions)
    if module.uses_gemm:
        module.functions.update(gemm.functions())
    for single in sorted(module.blas_tasks):
        module.functions[blas.task_name(single)] = blas.task(single, module.blas_int)
    if module.uses_gemm or module.blas_tasks:
        for name, ret, types in gemm.declarations():
            module.declare(name, ret, types)
    module.mains.append(worker)
    module.declare("usleep", "i32", ["i32"])
    module.declare("sched_yield", "i32", [])
    if pause:
        module.declare("llvm.x86.sse2.pause", "void", [])
    if timed:
        module.mains.append("define i64 @graphc_ticks() {\nentry:\n"
                            "  %now = call i64 @llvm.readcyclecounter()\n  ret i64 %now\n}\n")
    return module
