"""pycuda.driver, emulated on the CPU for graphc's tests: device memory is host memory, kernels
run through tests/cuda_emulator.py, and work queued on a stream runs only when the host waits for
it, in an order drawn at random among those its streams and events allow. A GPU may run queued
work at any time after it is queued, and this emulation runs it as late as possible: a missing
wait (staging overwritten before its copy ran, an output read before it came back, a kernel
that does not wait for its inputs' copy) gives wrong numbers here instead of passing by luck.

It also checks what a GPU would reject or corrupt: every pointer a kernel is given lies in live
device memory, no queued work touches memory freed after it was queued, asynchronous copies go
between device memory and page-locked host memory, and fresh device memory holds garbage (0xFF
bytes: NaN in floats), not zeros.

`stats` counts what happened (launches, host waits, and `drained`: waits after which nothing
was left queued, i.e. the device went idle for the host), for tests of the runtime's overlap.

Kernels other than the GEMM stride over their work by the grid, so they run with two blocks of
64 threads (emulated threads are fibers, tests/cuda_emulator.py); GEMM launches run with
their whole grid.
"""
from __future__ import annotations

import ctypes
import random
import re
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))     # tests/, for cuda_emulator
import cuda_emulator  # noqa: E402

from pycuda.compiler import MARK  # noqa: E402

stats = {"launches": 0, "waits": 0, "drained": 0}
SEED = 0


class Error(Exception):
    pass


class LogicError(Error):
    pass


def init(flags: int = 0) -> None:
    pass


class Device:
    def __init__(self, number: int):
        if number != 0:
            raise LogicError("the emulation has one device")

    @staticmethod
    def count() -> int:
        return 1

    def name(self) -> str:
        return "graphc CUDA emulator"

    def compute_capability(self) -> tuple[int, int]:
        return (0, 0)          # no real architecture: its code never meets a real GPU's cache

    def retain_primary_context(self) -> Context:
        return Context()


class Context:
    def push(self) -> None:
        _thread.depth = getattr(_thread, "depth", 0) + 1

    @staticmethod
    def pop() -> None:
        if not getattr(_thread, "depth", 0):
            raise LogicError("context stack is empty")
        _thread.depth -= 1

    @staticmethod
    def synchronize() -> None:
        _wait(lambda: not _queued())


# --- memory ---------------------------------------------------------------------------------------

_device: dict[int, np.ndarray] = {}        # address -> its allocation's bytes
_pinned: dict[int, np.ndarray] = {}        # address -> page-locked host bytes
# Freed allocations, kept until no queued work is left: queued work that touches one is a use
# after free, which a GPU would not report.
_freed: dict[int, np.ndarray] = {}


class DeviceAllocation:
    def __init__(self, nbytes: int):
        if nbytes <= 0:
            raise LogicError("cuMemAlloc failed: invalid value (0 bytes)")
        self._bytes = np.full(nbytes, 0xFF, dtype=np.uint8)
        self._address = self._bytes.ctypes.data
        _device[self._address] = self._bytes

    def __int__(self) -> int:
        return self._address

    __index__ = __int__

    def free(self) -> None:
        if self._bytes is not None:
            del _device[self._address]
            if _queued():
                _freed[self._address] = self._bytes
            self._bytes = None

    def __del__(self):
        self.free()


def mem_alloc(nbytes: int) -> DeviceAllocation:
    _check_context()
    return DeviceAllocation(int(nbytes))


def to_device(array) -> DeviceAllocation:
    array = np.ascontiguousarray(array)
    dev = mem_alloc(array.nbytes)
    memcpy_htod(dev, array)
    return dev


def pagelocked_empty(shape, dtype, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.full(max(count * dtype.itemsize, 1), 0xFF, dtype=np.uint8)
    _pinned[raw.ctypes.data] = raw
    return raw[:count * dtype.itemsize].view(dtype).reshape(shape, order=order)


def pagelocked_zeros(shape, dtype, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    out = pagelocked_empty(shape, dtype, order, mem_flags)
    out[...] = 0
    return out


def _inside(table: dict[int, np.ndarray], address: int, nbytes: int) -> bool:
    return any(base <= address and address + nbytes <= base + raw.nbytes
               for base, raw in table.items())


def _device_span(pointer, nbytes: int, what: str) -> int:
    address = int(pointer)
    if not _inside(_device, address, nbytes):
        raise LogicError(f"{what}: {nbytes} bytes at {address:#x} are not in live device memory")
    return address


def _host_span(array: np.ndarray, what: str, pinned: bool) -> int:
    if not array.flags.c_contiguous:
        raise LogicError(f"{what}: the host buffer is not contiguous")
    address = array.ctypes.data
    if pinned and not _inside(_pinned, address, array.nbytes):
        raise LogicError(f"{what}: the host buffer is not page-locked memory")
    return address


def memcpy_htod(dest, src) -> None:
    src = np.ascontiguousarray(src)
    _wait(lambda: not _queued())            # synchronous: after all work queued before
    ctypes.memmove(_device_span(dest, src.nbytes, "memcpy_htod"), src.ctypes.data, src.nbytes)


def memcpy_dtoh(dest: np.ndarray, src) -> None:
    if not dest.flags.writeable:
        raise LogicError("memcpy_dtoh: the host buffer is read-only")
    _wait(lambda: not _queued())
    ctypes.memmove(_host_span(dest, "memcpy_dtoh", pinned=False),
                   _device_span(src, dest.nbytes, "memcpy_dtoh"), dest.nbytes)


def memcpy_htod_async(dest, src: np.ndarray, stream: Stream | None = None) -> None:
    _check_context()
    host = _host_span(src, "memcpy_htod_async", pinned=True)
    device = _device_span(dest, src.nbytes, "memcpy_htod_async")
    _stream(stream).ops.append(("copy", device, host, src.nbytes, src))


def memcpy_dtoh_async(dest: np.ndarray, src, stream: Stream | None = None) -> None:
    _check_context()
    host = _host_span(dest, "memcpy_dtoh_async", pinned=True)
    device = _device_span(src, dest.nbytes, "memcpy_dtoh_async")
    _stream(stream).ops.append(("copy", host, device, dest.nbytes, dest))


# --- streams and events ---------------------------------------------------------------------------

class Stream:
    def __init__(self, flags: int = 0):
        _check_context()
        if flags:
            raise LogicError("only blocking streams are emulated")
        self.ops: deque = deque()
        _streams.append(self)

    def synchronize(self) -> None:
        _wait(lambda: not self.ops)

    def is_done(self) -> bool:
        return not self.ops

    def wait_for_event(self, event: Event) -> None:
        self.ops.append(("wait", event, event.recorded))


class Event:
    def __init__(self, flags: int = 0):
        _check_context()
        self.recorded = 0            # records asked for
        self.reached = 0             # records the device has reached
        self.when = None             # the host's clock when it reached the last one

    def record(self, stream: Stream | None = None) -> Event:
        _check_context()
        self.recorded += 1
        _stream(stream).ops.append(("record", self, self.recorded))
        return self

    def query(self) -> bool:
        _check_context()
        return self.reached == self.recorded

    def synchronize(self) -> Event:
        _wait(lambda: self.reached == self.recorded)
        return self

    def time_since(self, other: Event) -> float:
        if self.when is None or other.when is None:
            raise LogicError("cuEventElapsedTime failed: an event was not reached")
        return (self.when - other.when) * 1e3


_streams: list[Stream] = []
_null = None


def _stream(stream: Stream | None) -> Stream:
    global _null
    if stream is not None:
        return stream
    if _null is None:
        _null = Stream()
    return _null


def _queued() -> bool:
    return any(s.ops for s in _streams)


def _runnable(stream: Stream) -> bool:
    op = stream.ops[0]
    return op[0] != "wait" or op[1].reached >= op[2]


_rng = random.Random(SEED)


def _wait(done) -> None:
    """Run queued work, heads of streams in a random order their waits allow, until done()."""
    _check_context()
    stats["waits"] += 1
    ran = False
    while not done():
        ready = [s for s in _streams if s.ops and _runnable(s)]
        if not ready:
            raise LogicError("the host waits for work that can never run (a wait for an event "
                             "that is never recorded)")
        _execute(_rng.choice(ready).ops.popleft())
        ran = True
    if ran and not _queued():
        stats["drained"] += 1
    if not _queued():
        _freed.clear()


def _execute(op) -> None:
    kind = op[0]
    if kind == "copy":
        _, dst, src, nbytes, _ = op
        _not_freed((dst, src), op)
        ctypes.memmove(dst, src, nbytes)
    elif kind == "record":
        op[1].reached, op[1].when = max(op[1].reached, op[2]), time.perf_counter()
    elif kind == "launch":
        _, function, grid, block, args = op
        _not_freed(args[:-1], op)
        function._run(grid, block, args)


def _not_freed(addresses, op) -> None:
    for address in addresses:
        if address and _inside(_freed, address, 1):
            raise LogicError(f"use after free: queued {op[0]} touches {address:#x}, freed before "
                             f"it ran")


_thread = threading.local()        # each thread's context stack depth


def _check_context() -> None:
    if not getattr(_thread, "depth", 0):
        raise LogicError("no currently active context? (none is current on this thread)")


# --- modules and launches -------------------------------------------------------------------------

_BOUNDED = re.compile(r'extern "C" __global__ void __launch_bounds__\([\d, ]+\) (\w+)\(')


class Module:
    def __init__(self, source: str):
        self.library = cuda_emulator.build(source)
        self.whole_grid = set(_BOUNDED.findall(source))       # the GEMMs

    def get_function(self, name: str) -> Function:
        getattr(self.library, f"emu_{name}")                  # AttributeError: no such kernel
        return Function(self, name)


def module_from_buffer(buffer, options=(), message_handler=None) -> Module:
    _check_context()
    data = bytes(buffer)
    if not data.startswith(MARK):
        raise LogicError("cuModuleLoadData failed: not an emulated module")
    return Module(data[len(MARK):].decode())


class Function:
    def __init__(self, module: Module, name: str):
        self.module, self.name = module, name
        self.arg_types: str | None = None

    def prepare(self, arg_types) -> Function:
        self.arg_types = "".join(arg_types)
        return self

    def prepared_call(self, grid, block, *args, shared_size: int = 0) -> None:
        self.prepared_async_call(grid, block, None, *args)

    def prepared_async_call(self, grid, block, stream, *args, shared_size: int = 0) -> None:
        if self.arg_types is None:
            raise LogicError(f"{self.name}: prepared_async_call before prepare")
        for shape in (grid, block):         # pycuda takes tuples of ints (a list is an argument)
            if not isinstance(shape, tuple) or not all(type(v) is int and v > 0 for v in shape):
                raise LogicError(f"{self.name}: grid and block must be tuples of positive ints, "
                                 f"not {shape!r}")
        if block[0] > 1024 or grid[0] > 2**31 - 1 or len(grid) > 1 and grid[1] > 65535:
            raise LogicError(f"{self.name}: launch of grid {grid}, block {block} is too large")
        if len(args) != len(self.arg_types):
            raise LogicError(f"{self.name}: {len(args)} arguments for {len(self.arg_types)} types")
        values = []
        for kind, value in zip(self.arg_types, args):
            fits = isinstance(value, int | np.integer) and (kind == "P" or kind == "i" and
                                                             -2**31 <= value < 2**31)
            if not fits:
                raise LogicError(f"{self.name}: {value!r} does not fit argument type {kind!r}")
            values.append(int(value))
        self._enqueue(grid, block, stream, values)

    def __call__(self, *args, block, grid=(1, 1), stream=None, shared=0):
        self._enqueue(grid, block, stream, [int(a) for a in args])

    def _enqueue(self, grid, block, stream, values) -> None:
        _check_context()
        # Pointers (all but the last argument, the kernel's index) must lie in device memory.
        for pointer in values[:-1]:
            if pointer:
                _device_span(pointer, 1, f"launch of {self.name}")
        stats["launches"] += 1
        _stream(stream).ops.append(("launch", self, tuple(grid), tuple(block), values))

    def _run(self, grid, block, values) -> None:
        *buffers, dims, status, index = values
        gx, gy = grid[0], grid[1] if len(grid) > 1 else 1
        threads = block[0]
        if self.name not in self.module.whole_grid:    # grid-stride kernels: a smaller grid
            gx, gy, threads = min(gx, 2), 1, 64
        array = (ctypes.c_void_p * max(1, len(buffers)))(*buffers)
        getattr(self.module.library, f"emu_{self.name}")(
            array, ctypes.c_void_p(dims), ctypes.c_void_p(status), ctypes.c_int(index),
            ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(threads))
