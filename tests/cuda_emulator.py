"""Runs graphc's generated CUDA C on the CPU, to check what the kernels compute where there is no
GPU. The .cu file is compiled as C++20 with a small header that stands in for CUDA: a block's
threads are fibers (ucontext) on the launching thread, run in turn, each until it waits at a
barrier or returns; `__syncthreads` is a barrier over them, `__shfl_down_sync` an exchange through
a per-warp buffer between two barriers, `__shared__` a static (blocks run one after another).
Launches are replayed like graphc/backends/cuda/executor.py does, on host memory. (Fibers, not one
OS thread per emulated thread: the same synchronization at barriers, without the thread start-ups
and futex hand-offs that made the emulated tests five to ten times slower on two cores.) Threads
run in index order between barriers, so a missing barrier before reading what a higher thread or
lane writes (a shuffle, a tree reduction in shared memory) reads a stale value and fails; a
barrier that some threads of a block never reach aborts with a message instead of hanging.

What it cannot show: timing, occupancy, races that a GPU's scheduling would expose, and the GPU's
own float rounding (FMA contraction differs). Those need a GPU (tests/test_cuda_backend.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from graphc.backends.cuda import codegen
from graphc.backends.kernels import plan_kernels
from graphc.backends.kernels.ir import sval
from graphc.backends.kernels.memory import ALIGN, plan_arena

CXX = shutil.which("g++")

SHIM = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>
#include <ucontext.h>
using std::exp; using std::log; using std::sqrt; using std::tanh; using std::log1p; using std::pow;
using std::fabs; using std::fmax; using std::fmin; using std::erf;
struct gc_dim3 { unsigned x = 0, y = 0, z = 0; };
// The running fiber's (set before it is resumed; a fiber sees only its own values).
static gc_dim3 threadIdx, blockIdx;
static gc_dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
typedef unsigned short __half;          // f16 is not emulated

// A block's threads are fibers on the launching thread, run round robin: each runs until it
// waits at a barrier or returns. A barrier lets its waiters on once all its threads arrived.
struct gc_fiber { ucontext_t ctx; bool done; };
struct gc_barrier { unsigned n = 0, count = 0, gen = 0; };
static ucontext_t gc_main;
static std::vector<gc_fiber> gc_fibers;
static std::vector<std::unique_ptr<char[]>> gc_stacks;
static const size_t GC_STACK = 256 * 1024;
static unsigned gc_current;
static unsigned long long gc_progress;         // arrivals and exits: a round without any is a deadlock
static const std::function<void()>* gc_body;
static gc_barrier gc_block;
static gc_barrier gc_warp_barrier[32];
static unsigned long long gc_slots[1024];

inline void gc_yield() {
    asm volatile("" ::: "memory");             // memory written by other fibers is read afresh
    swapcontext(&gc_fibers[gc_current].ctx, &gc_main);
    asm volatile("" ::: "memory");
}
inline void gc_wait(gc_barrier& b) {
    const unsigned gen = b.gen;
    ++gc_progress;
    if (++b.count == b.n) { b.count = 0; ++b.gen; return; }
    while (b.gen == gen) gc_yield();
}
inline void __syncthreads() { gc_wait(gc_block); }
template <class T> T __shfl_down_sync(unsigned, T v, int offset) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::memcpy(&gc_slots[threadIdx.x], &v, sizeof(T));
    gc_wait(gc_warp_barrier[warp]);
    T out = v;
    if (lane + offset < 32) std::memcpy(&out, &gc_slots[threadIdx.x + offset], sizeof(T));
    gc_wait(gc_warp_barrier[warp]);
    return out;
}
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
    return __sync_val_compare_and_swap(p, cmp, v);
}
inline float __half2float(__half) { return 0; }
inline __half __float2half(float) { return 0; }

static void gc_fiber_main() {
    (*gc_body)();
    gc_fibers[gc_current].done = true;
    ++gc_progress;
}                                               // then on to uc_link, the scheduler

static void gc_launch(unsigned gx, unsigned gy, unsigned threads, const std::function<void()>& body) {
    static std::mutex one_launch_at_a_time;     // the state above is the running launch's
    std::lock_guard<std::mutex> hold(one_launch_at_a_time);
    if (threads == 0 || threads > 1024) {
        std::fprintf(stderr, "cuda emulator: %u threads a block (1 to 1024)\n", threads);
        std::abort();
    }
    blockDim = {threads, 1, 1};
    gridDim = {gx, gy, 1};
    gc_body = &body;
    gc_fibers.resize(threads);
    while (gc_stacks.size() < threads) gc_stacks.emplace_back(new char[GC_STACK]);
    gc_block = {threads, 0, 0};
    for (unsigned w = 0; w * 32 < threads; ++w) gc_warp_barrier[w] = {std::min(32u, threads - w * 32), 0, 0};
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
            blockIdx = {bx, by, 0};
            for (unsigned t = 0; t < threads; ++t) {
                gc_fiber& f = gc_fibers[t];
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = gc_stacks[t].get();
                f.ctx.uc_stack.ss_size = GC_STACK;
                f.ctx.uc_link = &gc_main;
                makecontext(&f.ctx, gc_fiber_main, 0);
                f.done = false;
            }
            for (unsigned left = threads; left;) {
                const unsigned long long before = gc_progress;
                for (unsigned t = 0; t < threads; ++t) {
                    if (gc_fibers[t].done) continue;
                    gc_current = t;
                    threadIdx = {t, 0, 0};
                    swapcontext(&gc_main, &gc_fibers[t].ctx);
                    if (gc_fibers[t].done) --left;
                }
                if (left && gc_progress == before) {
                    std::fprintf(stderr, "cuda emulator: deadlock, %u threads of block (%u, %u) wait at a "
                                 "barrier that the others never reach\n", left, bx, by);
                    std::abort();
                }
            }
        }
}
"""

_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([\d, ]+\) )?(\w+)\((.*?)\) \{')


def _wrappers(text: str) -> str:
    out = []
    for name, params in _SIGNATURE.findall(text):
        parts = [p.strip() for p in params.split(",")]
        buffers = parts[:-3]             # then dims, status, kernel
        casts = [f"({p.split('__restrict__')[0].strip()})a[{i}]" for i, p in enumerate(buffers)]
        args = ", ".join(casts + ["(const i64*)dims", "status", "kernel"])
        out.append(f'extern "C" void emu_{name}(void** a, const long long* dims, long long* status, '
                   f'int kernel, unsigned gx, unsigned gy, unsigned threads) {{\n'
                   f"    gc_launch(gx, gy, threads, [&] {{ {name}({args}); }});\n}}")
    return "\n".join(out)


def build(text: str) -> ctypes.CDLL:
    """The kernels of `text` (a rendered module) as a shared library of emu_NAME launchers."""
    source = SHIM + text.replace("#include <cuda_fp16.h>", "") + "\n" + _wrappers(text)
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "graphc-cuda-emulator"
    folder.mkdir(exist_ok=True)
    lib = folder / f"{key}.so"
    if not lib.exists():
        cpp = folder / f"{key}.cpp"
        cpp.write_text(source)
        tmp = folder / f"{key}.{id(source)}.so"
        done = subprocess.run([CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w",
                               "-o", str(tmp), str(cpp)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"g++ failed:\n{done.stderr[-4000:]}")
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))


class Emulated:
    """Kernel plans (graph key -> plan) rendered as one CUDA module and run emulated."""

    def __init__(self, plans: dict):
        self.plans = plans
        self.text, self.launches = codegen.render_module(plans)
        self.lib = build(self.text)

    @classmethod
    def of(cls, program) -> Emulated:
        return cls({key: plan_kernels(graph, program.updates(key))
                    for key, graph in program.graphs.items()})

    def run(self, key: str, feeds: dict, params: dict, state: dict, dims: dict) -> dict:
        """Outputs of graph `key`; params and state are updated in place where the plan says."""
        plan = self.plans[key]
        arena = plan_arena(codegen.launched(plan), dims)
        memory = np.zeros(arena.size + ALIGN, dtype=np.uint8)
        base = memory.ctypes.data + (-memory.ctypes.data) % ALIGN
        pointers = {b: base + off for b, off in arena.offsets.items()}
        keep = []
        for b in plan.buffers:
            if b.kind == "input":
                array = np.ascontiguousarray(feeds[b.name], dtype=b.dtype.numpy).reshape(-1)
                keep.append(array)
                pointers[b.id] = array.ctypes.data
            elif b.kind in ("param", "state"):
                array = (params if b.kind == "param" else state)[b.name]
                assert array.flags.c_contiguous and array.dtype == b.dtype.numpy
                pointers[b.id] = array.ctypes.data
        for alias, target in plan.aliases.items():
            pointers[alias] = pointers[target]
        dims_array = np.array([dims.get(s, 0) for s in plan.symbols] or [0], dtype=np.int64)
        status = np.zeros(3, dtype=np.int64)
        for launch in self.launches[key]:
            gx, gy = _grid(launch, dims)
            args = (ctypes.c_void_p * max(1, len(launch.buffers)))(*[pointers[b] for b in launch.buffers])
            # Kernels other than the GEMM stride over their work by blockDim: blocks of two warps
            # exercise that (and the shuffles) at a quarter of the threads to start.
            threads = codegen.GEMM_THREADS if launch.kind == "gemm" else 64
            getattr(self.lib, f"emu_{launch.kernel}")(
                args, dims_array.ctypes.data_as(ctypes.c_void_p), status.ctypes.data_as(ctypes.c_void_p),
                ctypes.c_int(launch.index), ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(threads))
        if status[0]:
            raise ValueError(f"check failed: code {status[0]}, value {status[1]}, kernel {status[2]}")
        out = {}
        in_place = set(plan.aliases.values())
        for name, access, shape, dtype in plan.outputs:
            buf = plan.aliases.get(access.buffer, access.buffer)
            if buf in in_place and shape and name.startswith("new "):
                continue                       # updated in place, as the cuda executor does
            size = [sval(s, dims) for s in shape]
            item = dtype.numpy.itemsize
            offset = sum(sval(t, dims) for t in access.offset)
            strides = [sval(s, dims) * item for s in access.strides]
            nbytes = _extent(size, strides, item)
            raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(pointers[buf] + offset * item))
            out[name] = np.lib.stride_tricks.as_strided(raw.view(dtype.numpy), size, strides).copy()
        del memory                              # (the arena lives until the outputs are copied)
        return out


def _extent(size, strides, item) -> int:
    if not size:
        return item
    return item + sum((d - 1) * s for d, s in zip(size, strides) if d > 0)


def _grid(launch: codegen.Launch, dims: dict) -> tuple[int, int]:
    """GEMM tiles need their whole grid; the other kernels stride over their work, so two blocks
    (enough to exercise the striding) do all of it."""
    if launch.kind == "gemm":
        m, n = (sval(s, dims) for s in launch.work)
        return max(1, -(-n // codegen.GEMM_BN)), max(1, -(-m // codegen.GEMM_BM))
    return 2, 1
