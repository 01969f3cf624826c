"""Both cores for the generated kernels: a worker thread that takes chunks of a kernel's outer loop
while the calling thread takes the others.

A kernel whose outer loop writes disjoint parts of its outputs (elementwise kernels, reductions
over trailing axes, col2im over channels: `splittable`) is rendered taking `i64 lo, i64 hi`, the
range of its outer loop, and a task function per call site that loads its buffers from the
pointer table. For a large call (`MIN_POINTS` points or more) graph_main calls `graphc_parallel`:
it publishes the task in the pool (a block of i64 words the host allocates, its address in the
`blas` table's third slot) and takes chunks itself; the worker thread (`graphc_worker`, started
once per process, in a ctypes call that releases the GIL) takes chunks too. Chunks are claimed by
compare-and-swap on one word, `state` = sequence << 40 | chunks << 32 | next chunk, so a chunk of
an old task can never be taken for a new one; the task's fields are read only after a successful
claim (the task is then unfinished, so they are its own). The caller waits for every chunk to be
done, then hands the pool back. A second graph running at the same time (another Python thread)
finds the pool owned and runs its kernel alone. The worker spins briefly between tasks, then
sleeps in naps (`usleep`) that grow from 50 µs to 1 ms while it stays idle, so an idle program
costs the other core a few percent (spinning on, it took over half of it from other processes and
from BLAS's own threads); a caller never waits for
the worker to wake: it takes every chunk that is left, and while it waits for a chunk the worker
holds it spins briefly, then yields its core (on a machine shared with other processes the worker
may have been descheduled mid-chunk). Matrix products use the same pool from inside their
kernels (gemm.py): graphc's GEMM deals out panels of columns, a BLAS call its parts.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

MIN_POINTS = 1 << 16      # smaller kernels run on the calling thread (a task costs about a µs)
CHUNKS = 16               # per task, at most (one per outer index below that)
SPINS = 4000              # idle polls with `pause` before the worker naps
NAP_US = 50               # its first nap; each further one 50 µs longer, up to
MAX_NAP_US = 1000         # (so an idle worker wakes about a thousand times a second)
# pool words
OWNER, STATE, DONE, FN, BUFS, DIMS, STATUS, BLAS, COUNT, QUIT = range(10)
POOL_WORDS = 16


def _word(name: str, pool: str, index: int) -> str:
    return f"  %{name} = getelementptr i64, ptr {pool}, i64 {index}"


def helpers(pause: bool) -> tuple[dict[str, str], str]:
    """The IR of `graphc_claim` and `graphc_parallel` (called by graph_main), by name, and of
    `graphc_worker` (the worker's loop; exported, the host starts it). `pause`: the target has
    x86's pause instruction (for spinning)."""
    relax = "  call void @llvm.x86.sse2.pause()\n" if pause else ""
    fields = "\n".join(_word(n, "%pool", i) for n, i in (
        ("owner", OWNER), ("state", STATE), ("done", DONE), ("fnp", FN), ("bufsp", BUFS),
        ("dimsp", DIMS), ("statusp", STATUS), ("blasp", BLAS), ("countp", COUNT), ("quitp", QUIT)))
    # claim: take one chunk of the published task and run it; true when it did, or when its
    # claim raced another (try again); false when no chunk is left. The caller's and the worker's.
    claim = f"""define internal i1 @graphc_claim(ptr %pool) noinline {{
entry:
{fields}
  %st = load atomic i64, ptr %state acquire, align 8
  %next = and i64 %st, 4294967295
  %chunks = and i64 %st, 1095216660480
  %total = lshr i64 %chunks, 32
  %left = icmp ult i64 %next, %total
  br i1 %left, label %try, label %none
try:
  %st1 = add i64 %st, 1
  %cas = cmpxchg ptr %state, i64 %st, i64 %st1 acq_rel acquire
  %won = extractvalue {{ i64, i1 }} %cas, 1
  br i1 %won, label %run, label %retry
retry:
  ret i1 true
run:
  %fn = load ptr, ptr %fnp
  %bufs = load ptr, ptr %bufsp
  %dims = load ptr, ptr %dimsp
  %status = load ptr, ptr %statusp
  %blas = load ptr, ptr %blasp
  %count = load i64, ptr %countp
  %a = mul i64 %next, %count
  %lo = udiv i64 %a, %total
  %next1 = add i64 %next, 1
  %b = mul i64 %next1, %count
  %hi = udiv i64 %b, %total
  call void %fn(ptr %bufs, ptr %dims, ptr %status, ptr %blas, i64 %lo, i64 %hi)
  %old = atomicrmw add ptr %done, i64 1 release
  ret i1 true
none:
  ret i1 false
}}
"""
    signature = "ptr %pool, ptr %fn, ptr %bufs, ptr %dims, ptr %status, ptr %blas, i64 %count"
    parallel = f"""define internal void @graphc_parallel({signature}) noinline {{
entry:
{fields}
  %own = cmpxchg ptr %owner, i64 0, i64 1 acquire monotonic
  %mine = extractvalue {{ i64, i1 }} %own, 1
  br i1 %mine, label %publish, label %alone
alone:
  call void %fn(ptr %bufs, ptr %dims, ptr %status, ptr %blas, i64 0, i64 %count)
  ret void
publish:
  %few = icmp ult i64 %count, {CHUNKS}
  %total = select i1 %few, i64 %count, i64 {CHUNKS}
  store ptr %fn, ptr %fnp
  store ptr %bufs, ptr %bufsp
  store ptr %dims, ptr %dimsp
  store ptr %status, ptr %statusp
  store ptr %blas, ptr %blasp
  store i64 %count, ptr %countp
  store atomic i64 0, ptr %done monotonic, align 8
  %st = load atomic i64, ptr %state monotonic, align 8
  %seq = lshr i64 %st, 40
  %seq1 = add i64 %seq, 1
  %seqw = shl i64 %seq1, 40
  %tw = shl i64 %total, 32
  %new = or i64 %seqw, %tw
  store atomic i64 %new, ptr %state release, align 8
  br label %take
take:
  %more = call i1 @graphc_claim(ptr %pool)
  br i1 %more, label %take, label %wait
wait:
  %waited = phi i64 [0, %take], [%waited1, %relax], [0, %yield]
  %d = load atomic i64, ptr %done acquire, align 8
  %all = icmp uge i64 %d, %total
  br i1 %all, label %finish, label %spin
spin:
  %waited1 = add i64 %waited, 1
  %long = icmp ugt i64 %waited1, {SPINS}
  br i1 %long, label %yield, label %relax
relax:
{relax}  br label %wait
yield:
  %y = call i32 @sched_yield()
  br label %wait
finish:
  store atomic i64 0, ptr %owner release, align 8
  ret void
}}
"""
    worker = f"""define void @graphc_worker(ptr %pool) noinline {{
entry:
{fields}
  br label %poll
poll:
  %idle = phi i64 [0, %entry], [0, %again], [%idle1, %spin], [%idle1, %nap]
  %q = load atomic i64, ptr %quitp acquire, align 8
  %stop = icmp ne i64 %q, 0
  br i1 %stop, label %exit, label %look
look:
  %took = call i1 @graphc_claim(ptr %pool)
  br i1 %took, label %again, label %nothing
again:
  br label %poll
nothing:
  %idle1 = add i64 %idle, 1
  %tired = icmp ugt i64 %idle1, {SPINS}
  br i1 %tired, label %nap, label %spin
spin:
{relax}  br label %poll
nap:
  %naps = sub i64 %idle1, {SPINS}
  %grown = mul i64 %naps, {NAP_US}
  %short = icmp ult i64 %grown, {MAX_NAP_US}
  %us64 = select i1 %short, i64 %grown, i64 {MAX_NAP_US}
  %us = trunc i64 %us64 to i32
  %r = call i32 @usleep(i32 %us)
  br label %poll
exit:
  ret void
}}
"""
    return {"graphc_claim": claim, "graphc_parallel": parallel}, worker


def splittable(kernel, resolve) -> bool:
    """Does each index of `kernel`'s outer loop (a coalesced kernel) write its own part of every
    output, so that ranges of it may run at once? Elementwise kernels and reductions over
    trailing axes whose stores give the outer axis a stride at least the extent of the rest (a
    row-major or permuted layout; col2im over channels), no check (one_hot's status word), and
    every read of a written buffer at the point written (in-place updates, col2im's own sum)."""
    from graphc.backends.kernels.ir import Op, walk
    if kernel.matmul is not None or not kernel.space or 0 in kernel.reduce_axes:
        return False
    rank = len(kernel.space)
    if kernel.reduce_axes and set(kernel.reduce_axes) != set(range(rank - len(kernel.reduce_axes), rank)):
        return False
    if any(isinstance(e, Op) and e.op == "one_hot" for e in walk(s.expr for s in kernel.stores)):
        return False
    written = {}
    for s in kernel.stores:
        written.setdefault(resolve(s.access.buffer), []).append(s.access)
        for dims in (1, 1000):      # the batch's size: sizes are monomials in it
            def value(size, dims=dims):
                return size[0] * dims ** len(size[1])
            extent = sum(value(sz) * value(st) - value(st) for sz, st in
                         zip(kernel.space[1:], s.access.strides[1:]) if st[0]) + 1
            if value(s.access.strides[0]) < extent or kernel.space[0][0] == 0:
                return False
    for a in kernel.loads:
        for w in written.get(resolve(a.buffer), ()):
            if (a.strides, a.offset) != (w.strides, w.offset):
                return False
    return True


def task(name: str, kernel: str, buffers: list[int]) -> str:
    """A task function for one call of `kernel` (on `buffers` of the pointer table)."""
    lines = [f"define internal void @{name}(ptr %bufs, ptr %dims, ptr %status, ptr %blas, i64 %lo, "
             "i64 %hi) noinline {", "entry:"]
    for b in buffers:
        lines.append(f"  %p{b} = getelementptr ptr, ptr %bufs, i64 {b}")
        lines.append(f"  %b{b} = load ptr, ptr %p{b}")
    args = "".join(f"ptr %b{b}, " for b in buffers)
    lines += [f"  call void @{kernel}({args}ptr %dims, ptr %status, ptr %blas, i64 %lo, i64 %hi)",
              "  ret void", "}", ""]
    return "\n".join(lines)


# --- the host side -------------------------------------------------------------------------------

_lock = threading.Lock()
_pool: np.ndarray | None = None
_keep: list = []                  # the worker's compiled code stays loaded for the process's life


def enabled() -> bool:
    """Whether the kernels may use a second thread: more than one CPU is ours, and
    GRAPHC_THREADS is not 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus > 1 and os.environ.get("GRAPHC_THREADS", "") != "1"


def pool_address(compiled) -> int:
    """The pool's address, its worker thread started (once per process, on the loop compiled in
    `compiled`, which stays loaded)."""
    global _pool
    with _lock:
        if _pool is None:
            pool = np.zeros(POOL_WORDS, dtype=np.int64)
            loop = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(compiled.address("graphc_worker"))
            _keep.extend([compiled, loop])
            thread = threading.Thread(target=loop, args=(pool.ctypes.data,), daemon=True,
                                      name="graphc-kernels")
            thread.start()
            _pool = pool
        return _pool.ctypes.data


class OneBlasThread:
    """While a graph with a large product runs (blas.PARALLEL_BLAS multiply-adds or more),
    OpenBLAS runs single-threaded: graphc's pool deals out the products' calls to both cores
    itself (gemm.py's BLAS task), and with no pool (GRAPHC_THREADS=1) the same calls run in
    turn, so results do not depend on the thread count. OpenBLAS's own threads spin for a while
    after each call they serve (its THREAD_TIMEOUT), and beside them the pool's worker had half
    a core: graphc's GEMM measured at one core's speed in a train step. Counted, so graphs
    running at once in several Python threads restore the count the first of them found only
    when the last one is done. The count is the process's: numpy's products in other Python
    threads run single-threaded meanwhile, and a count set while a graph runs is undone."""

    def __init__(self, calls: tuple):
        self.set, self.get = calls
        self.users = 0
        self.saved = 1

    def __enter__(self):
        with _lock:
            if not self.users:
                self.saved = self.get()
                if self.saved != 1:
                    self.set(1)
            self.users += 1

    def __exit__(self, *exc):
        with _lock:
            self.users -= 1
            if not self.users and self.saved != 1:
                self.set(self.saved)


_one_blas: list[OneBlasThread] = []


def one_blas_thread(calls: tuple) -> OneBlasThread:
    """The process's one OneBlasThread (numpy links one BLAS)."""
    with _lock:
        if not _one_blas:
            _one_blas.append(OneBlasThread(calls))
        return _one_blas[0]


# The C library functions the generated thread and GEMM code calls (registered with the JIT below).
C_FUNCTIONS = ("usleep", "sched_yield", "malloc", "free")


def register_symbols(llvm) -> None:
    """The C library's usleep (the worker's naps), sched_yield (a caller waiting long for a
    chunk the worker holds: on a busy machine the worker may have lost its core), malloc and
    free (gemm.py's packed blocks), for the JIT."""
    libc = ctypes.CDLL(None)
    for name in C_FUNCTIONS:
        llvm.add_symbol(name, ctypes.cast(getattr(libc, name), ctypes.c_void_p).value)
