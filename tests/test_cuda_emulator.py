"""The CUDA emulator itself (tests/cuda_emulator.py), on hand-written kernels: a block's threads
meet at `__syncthreads`, warp shuffles exchange lanes' values, every block of the grid runs, and
a barrier that some threads never reach stops the process with a message instead of hanging."""
from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cuda_emulator import CXX, build

pytestmark = pytest.mark.skipif(CXX is None, reason="the CUDA emulator compiles with g++")

KERNELS = """typedef long long i64;
extern "C" __global__ void gc_t_sums(long long* __restrict__ out, const i64* d, long long* s, int k) {
    __shared__ long long seen[256];
    const unsigned t = threadIdx.x;
    seen[t] = t + 1000 * blockIdx.x;
    __syncthreads();                          // every thread's value is in before any is read
    long long total = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) total += seen[(t + i) % blockDim.x];
    long long lanes = t;                      // the warp's lanes summed by shuffles, into lane 0
    for (int o = 16; o > 0; o >>= 1) lanes += __shfl_down_sync(0xffffffffu, lanes, o);
    __syncthreads();                          // nobody writes seen[] while another reads it
    seen[t] = 0;
    if (t % 32 == 0) out[3 * blockIdx.x + t / 32] = lanes;
    if (t == 0) out[3 * blockIdx.x + 2] = total;
}
extern "C" __global__ void gc_t_stuck(long long* __restrict__ out, const i64* d, long long* s, int k) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
"""


def _launch(lib, name: str, out: np.ndarray, blocks: int, threads: int) -> None:
    dims, status = np.zeros(1, dtype=np.int64), np.zeros(3, dtype=np.int64)
    args = (ctypes.c_void_p * 1)(out.ctypes.data)
    getattr(lib, f"emu_{name}")(args, dims.ctypes.data_as(ctypes.c_void_p),
                                status.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(0),
                                ctypes.c_uint(blocks), ctypes.c_uint(1), ctypes.c_uint(threads))


def test_barriers_and_shuffles_exchange_the_threads_values_in_every_block():
    lib = build(KERNELS)
    out = np.full(9, -1, dtype=np.int64)
    _launch(lib, "gc_t_sums", out, blocks=3, threads=64)
    for b in range(3):
        assert out[3 * b] == sum(range(32)) and out[3 * b + 1] == sum(range(32, 64))
        assert out[3 * b + 2] == sum(range(64)) + 64 * 1000 * b


def test_a_barrier_that_a_thread_never_reaches_stops_with_a_message():
    build(KERNELS)                            # compiled here, not in the child
    child = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import numpy as np
from cuda_emulator import build
from test_cuda_emulator import KERNELS, _launch
_launch(build(KERNELS), "gc_t_stuck", np.zeros(64, dtype=np.int64), blocks=1, threads=64)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "deadlock, 63 threads of block (0, 0) wait at a barrier" in done.stderr
