"""The cuda executor: a graph's kernel plan rendered as CUDA C (codegen.py), compiled with nvcc for
the GPU's own architecture (cached on disk), and replayed launch by launch through pycuda.

Planning and rendering need no GPU and no pycuda (`graphc build --backend cuda --emit-source`
works anywhere); pycuda, a driver and a GPU are needed from the first compile or run on, and a
missing one is one clear sentence (`CudaUnavailable`).

Memory: parameters and optimizer state live on the device from their first use and are updated
there in place (no `new X` output is returned, the step count's neither: the program counts
steps on the host); the host arrays are brought up to date when the program reads them
(`sync_to_host`). Temporaries live in one device arena per batch shape.

Runs are queued, not waited for (`submit`): a run's inputs are staged in page-locked host memory
and copied up on a copy stream, its launches follow on the compute stream once that copy is done,
and its outputs (a train step's: the loss alone) come back into page-locked memory behind it. Each
batch shape has SLOTS sets of that staging, so the host prepares the next batch while the device
computes the one before; the host waits only when it reads a result (`Pending.result`) or reuses
a slot whose run is still in flight. A failed check (a label out of range) stays set on the device
until the host reads it, so the runs queued behind the failed one change nothing either. The
device's context is made current around each use, so any thread may call.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Sequence

import numpy as np

from graphc.backends.cuda import codegen
from graphc.backends.kernels import plan_kernels
from graphc.backends.kernels.ir import sval
from graphc.backends.kernels.memory import ALIGN, plan_arena
from graphc.backends.kernels.tables import check_lowerable
from graphc.cache import cache_dir
from graphc.errors import Diagnostic, GraphcError
from graphc.files import atomic_write
from graphc.ir.contract import Update
from graphc.ir.node import Graph

MAX_BLOCKS = 65535 * 4
SLOTS = 2                 # runs in flight per batch shape


class CudaUnavailable(GraphcError):
    """No pycuda, no driver or no GPU: what is missing and what to do."""


@functools.cache
def _driver():
    """pycuda's driver and device 0's primary context (not left current: `_current` makes it
    current around each use, on whatever thread), or a CudaUnavailable saying what is missing."""
    try:
        import pycuda.driver as drv
    except ImportError as exc:
        missing = getattr(exc, "name", None) in ("pycuda", None) and "libcuda" not in str(exc)
        raise CudaUnavailable(_diagnostic(
            "the cuda backend needs pycuda, which is not installed" if missing
            else f"pycuda is installed but cannot load the CUDA driver ({exc})",
            hint="install it from graphc's clone with `pip install -e '.[cuda]'` on a machine with "
                 "the CUDA toolkit (it builds from source; see the README), or use --backend llvm"
            if missing
            else "install the NVIDIA driver, or use --backend llvm")) from None
    try:
        drv.init()
        count = drv.Device.count()
    except Exception as exc:     # pycuda raises its own LogicError/RuntimeError kinds
        raise CudaUnavailable(_diagnostic(
            f"no usable CUDA GPU or driver ({exc})",
            hint="on a machine without an NVIDIA GPU use --backend llvm")) from None
    if count == 0:
        raise CudaUnavailable(_diagnostic("no CUDA GPU found", hint="use --backend llvm on this machine"))
    device = drv.Device(0)
    return drv, device, device.retain_primary_context()


@contextlib.contextmanager
def _current():
    """The driver, with the device's context current on this thread for the block: pushed and
    popped around each use, so no thread exits (and no interpreter shuts down) with it still on
    its stack, which pycuda answers with abort()."""
    drv, _, context = _driver()
    context.push()
    try:
        yield drv
    finally:
        drv.Context.pop()


def _diagnostic(message: str, hint: str) -> Diagnostic:
    return Diagnostic(message, None, hint, "error", None, None)


def device_arch() -> str:
    _, device, _ = _driver()
    major, minor = device.compute_capability()
    return f"sm_{major}{minor}"


def compile_cubin(source: str, arch: str) -> bytes:
    """nvcc's cubin of `source` for `arch`, from the cache when it is there (then no nvcc is
    needed: a machine with the driver alone runs cached code)."""
    key = hashlib.sha256("\0".join([codegen.CODEGEN_VERSION, arch, source]).encode())
    path = cache_dir() / "cuda" / (key.hexdigest()[:40] + ".cubin")
    try:
        return path.read_bytes()
    except OSError:
        pass
    from pycuda.compiler import CompileError
    from pycuda.compiler import compile as nvcc_compile
    try:
        cubin = nvcc_compile(source, arch=arch, no_extern_c=True, cache_dir=False)
    except (OSError, CompileError) as exc:
        raise CudaUnavailable(_diagnostic(
            f"nvcc could not compile graphc's kernels for {arch} ({str(exc).splitlines()[0]})",
            hint="install the CUDA toolkit (nvcc on PATH) matching the driver")) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, cubin)
    except OSError:
        pass
    return cubin


class _Code:
    """The CUDA module of linked executors: rendered once, compiled and loaded on first use."""

    def __init__(self, executors: dict[str, CUDAExecutor], precision: str = "f32"):
        self.executors = executors
        self.precision = precision
        self._text: str | None = None
        self.launches: dict[str, list[codegen.Launch]] = {}
        self.functions: dict[str, object] = {}
        # Parameters and state on the device, shared by the linked graphs: name -> (the host
        # array it was uploaded from, its device copy). `dirty`: the device holds newer values.
        self.resident: dict[str, tuple] = {}
        self.uploads = 0            # how many uploads there were: launch arguments hold pointers
        self.stops = 0              # failed checks cleared from the device's status words
        self.status = None          # the status words, one set for all the graphs' runs
        self.dirty = False
        # One lock for the linked graphs: they share the device's parameters (a forward pass
        # must not read them while a train step writes them) and the compiled module.
        self.lock = threading.RLock()

    def text(self) -> str:
        if self._text is None:
            plans = {key: ex.plan for key, ex in self.executors.items()}
            self._text, self.launches = codegen.render_module(plans, self.precision)
        return self._text

    def compile(self, drv) -> None:
        if self.functions:
            return
        module = drv.module_from_buffer(compile_cubin(self.text(), device_arch()))
        # Prepared launches: pycuda checks no argument types per call (buffers, dims and status
        # are pointers, the kernel's index an int).
        functions = {}
        for launches in self.launches.values():
            for launch in launches:
                if launch.kernel not in functions:
                    functions[launch.kernel] = module.get_function(launch.kernel).prepare(
                        "P" * (len(launch.buffers) + 2) + "i")
        self.module = module
        self.stream, self.copies = drv.Stream(), drv.Stream()
        # One failed check stops every run queued behind it, of any graph and batch shape.
        self.status = drv.to_device(np.zeros(3, np.int64))
        self.functions = functions
        for key, ex in self.executors.items():
            ex._launches = self.launches[key]

    def synchronize(self) -> None:
        """Wait for everything queued on the device."""
        if self.functions:
            self.copies.synchronize()
            self.stream.synchronize()

    def failure(self, status: np.ndarray) -> GraphcError:
        """The error a failed check wrote (code 1: a label out of range; the kernel argument
        says which graph's launch, see CUDAExecutor._bind)."""
        _, value, where = (int(v) for v in status)
        executor = list(self.executors.values())[where >> 16]
        launch = next(la for la in executor._launches if la.index == where & 0xFFFF)
        node = next(n for k in launch.kernels for n in executor.plan.kernels[k].nodes
                    if n.op == "one_hot")
        what = f" (computing {node.name})" if node.name else ""
        return GraphcError(Diagnostic(f"{node.op}{what}: class label {value} is out of range "
                                      f"[0, {node.attr['depth']})", node.loc))


class _Slot:
    """The staging of one run in flight: page-locked host memory and device buffers for its
    inputs, page-locked memory for its outputs and its copy of the status words, and the events
    that mark its inputs copied up and its outputs back."""

    def __init__(self, drv, plan, dims: dict[str, int], outputs: dict):
        self.inputs = {}
        for b in plan.buffers:
            count = sval(b.elements, dims)
            if b.kind == "input" and count:      # CUDA allocates no 0 bytes; no kernel reads it
                host = drv.pagelocked_empty(count, b.dtype.numpy)
                self.inputs[b.id] = (b.name, host, drv.mem_alloc(host.nbytes))
        # name -> (element offset in its buffer, the buffer, page-locked copy of the span,
        # shape, strides in bytes)
        self.outputs = {name: (offset, buf, drv.pagelocked_empty(max(span, 1), dtype), size,
                               [s * np.dtype(dtype).itemsize for s in strides])
                        for name, (offset, buf, span, dtype, size, strides) in outputs.items()}
        self.status = drv.pagelocked_zeros(3, np.int64)
        self.copied, self.done = drv.Event(), drv.Event()
        self.pending: Pending | None = None
        # Bound by CUDAExecutor._bind: each launch with its arguments, each output's copy back,
        # and the count of uploads they were made at.
        self.launches: list[tuple] = []
        self.copies_back: list[tuple] = []
        self.made_at = -1


class _Frame:
    """What runs at one batch shape keep: the arena (planned on the launch order, see
    codegen.launched), the dims on the device, and SLOTS slots."""

    def __init__(self, drv, executor: CUDAExecutor, dims: dict[str, int]):
        plan = executor.plan
        arena = plan_arena(executor.launched_plan, dims)
        self.memory = drv.mem_alloc(max(arena.size, 1) + ALIGN)
        base = int(self.memory) + (-int(self.memory)) % ALIGN
        self.pointers = {b: base + off for b, off in arena.offsets.items()}
        self.dims = drv.to_device(np.array([dims.get(s, 0) for s in plan.symbols] or [0], np.int64))
        outputs = {}
        for name, access, shape, dtype in plan.outputs:
            if name in executor.in_place:
                continue
            size = [sval(s, dims) for s in shape]
            strides = [sval(s, dims) for s in access.strides]
            offset = sum(sval(t, dims) for t in access.offset)
            span = 1 + sum((d - 1) * s for d, s in zip(size, strides)) if all(size) else 0
            buf = plan.aliases.get(access.buffer, access.buffer)
            outputs[name] = (offset, buf, span, dtype.numpy, size, strides)
        self.slots = [_Slot(drv, plan, dims, outputs) for _ in range(SLOTS)]
        self.turn = 0
        self.grids = [_grid(launch, dims) for launch in executor._launches]
        self.blocks = [(codegen.GEMM_THREADS if launch.kind == "gemm" else codegen.BLOCK, 1, 1)
                       for launch in executor._launches]


class Pending:
    """A run queued on the device. `result()` waits for it and returns its outputs, or raises the
    check that failed in it (or in a run queued before it); `ready()` tells without waiting."""

    def __init__(self, code: _Code, slot: _Slot):
        self._code, self._slot = code, slot
        self._outputs: dict[str, np.ndarray] | None = None
        self._failure: GraphcError | None = None
        self._stops = code.stops               # failures cleared before it was queued
        self.first = False                     # whether its wait found the device stopped

    def ready(self) -> bool:
        if self._slot is None:
            return True
        with self._code.lock, _current():
            return bool(self._slot.done.query())

    def result(self) -> dict[str, np.ndarray]:
        self.wait()
        if self._failure is not None:
            raise self._failure
        return self._outputs

    def wait(self) -> None:
        """Wait for the run and take its outputs out of the slot, which is then free."""
        slot = self._slot
        if slot is None:
            return
        code = self._code
        with code.lock, _current() as drv:
            slot.done.synchronize()
            if slot.status[0]:
                self._failure = code.failure(slot.status)
                if self._stops == code.stops:
                    # The first to see this failure: once the runs queued behind it have
                    # stopped too, the device may run again, from the parameters it had before.
                    self.first = True
                    code.synchronize()
                    drv.memcpy_htod(code.status, np.zeros(3, np.int64))
                    code.stops += 1
                    code.dirty = True
            else:
                self._outputs = {name: np.lib.stride_tricks.as_strided(host, size, strides).copy()
                                 for name, (_, _, host, size, strides) in slot.outputs.items()}
            slot.pending, self._slot = None, None


class CUDAExecutor:
    name = "cuda"
    source_suffix = ".cu"
    queues = True           # runs may be submitted without waiting (see `submit`)

    def __init__(self, graph: Graph, updates: Sequence[Update] = ()):
        """`updates`: the train step's contract (graphc.ir.contract), written in place."""
        self.graph = graph
        check_lowerable(graph, "cuda", codegen.LOWER, codegen.UNSUPPORTED)
        self.plan = plan_kernels(graph, updates)
        self._code = _Code({"graph": self})
        self._launches: list[codegen.Launch] = []
        self._frames: dict[tuple, _Frame] = {}
        in_place = set(self.plan.aliases.values())
        # Updated in place on the device and not returned.
        self.in_place = {name for name, access, _, _ in self.plan.outputs
                         if self.plan.aliases.get(access.buffer) in in_place}
        # The parameters and state it reads: (buffer, name, whether a parameter).
        self._held = [(b.id, b.name, b.kind == "param") for b in self.plan.buffers
                      if b.kind in ("param", "state")]

    @functools.cached_property
    def launched_plan(self):
        """The plan in launch order, one kernel per launch: what each batch shape's arena is
        planned on (codegen.launched; scheduled once, not per shape)."""
        return codegen.launched(self.plan)

    @classmethod
    def link(cls, executors: dict[str, CUDAExecutor], precision: str = "f32") -> None:
        """One module for the graphs of a program; `precision` "tf32" runs its f32 matrix
        products on the tensor cores (see docs/cuda.md for the tolerance)."""
        code = _Code(executors, precision)
        retired = [(ex._code, ex._frames) for ex in executors.values()]
        for ex in executors.values():
            ex._code = code
            ex._frames = {}                 # (their grids and arguments follow the launches)
        if any(old.functions for old, _ in retired):
            # pycuda frees device memory only with its context current on this thread
            with _current():
                for old, _ in retired:
                    old.synchronize()
                retired.clear()

    def source(self) -> str:
        """The CUDA C of the module this graph is compiled in (self-contained, for nvcc)."""
        return self._code.text()

    def compile(self, load: bool = True) -> None:
        """Compile for this machine's GPU and load. Without `load` there is nothing to do: the
        code is compiled for the GPU it runs on, at the first run there."""
        if load:
            with self._code.lock, _current() as drv:
                self._code.compile(drv)

    # --- running ---------------------------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray],
            dims: dict[str, int], state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        return self.submit(feeds, params, dims, state).result()

    def submit(self, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray],
               dims: dict[str, int], state: dict[str, np.ndarray] | None = None) -> Pending:
        """Queue a run on the device and return at once (the feeds are staged before it
        returns: the caller may reuse them)."""
        with self._code.lock, _current() as drv:
            return self._submit(drv, feeds, params, dims, state or {})

    def _submit(self, drv, feeds, params, dims, state) -> Pending:
        code = self._code
        code.compile(drv)
        key = tuple(dims.get(s, 0) for s in self.plan.symbols)
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = _Frame(drv, self, dims)
        slot = frame.slots[frame.turn % SLOTS]
        frame.turn += 1
        if slot.pending is not None:       # its run is still in flight (or its result unread)
            previous = slot.pending
            previous.wait()
            if previous.first:             # a failure nobody has seen yet stops this run too
                raise previous._failure
        # Parameters first: an upload is a synchronous copy, and changes launch arguments.
        resident = {id_: self._resident(drv, name, (params if is_param else state)[name])
                    for id_, name, is_param in self._held}
        for name, host, dev in slot.inputs.values():
            np.copyto(host, np.asarray(feeds[name]).reshape(-1), casting="unsafe")
            drv.memcpy_htod_async(dev, host, code.copies)
        slot.copied.record(code.copies)
        stream = code.stream
        stream.wait_for_event(slot.copied)
        if slot.made_at != code.uploads:       # made once per slot, unless parameters moved
            self._bind(frame, slot, resident)
        for fn, grid, block, args in slot.launches:
            fn.prepared_async_call(grid, block, stream, *args)
        drv.memcpy_dtoh_async(slot.status, code.status, stream)
        for host, source in slot.copies_back:
            drv.memcpy_dtoh_async(host, source, stream)
        slot.done.record(stream)
        code.dirty = code.dirty or bool(self.in_place)
        slot.pending = Pending(code, slot)
        return slot.pending

    def _bind(self, frame: _Frame, slot: _Slot, resident: dict[int, int]) -> None:
        """The slot's launches with their arguments (pointers), and its outputs' copies back."""
        pointers = {**frame.pointers, **resident}
        for b in self.plan.buffers:
            if b.kind == "input":
                staged = slot.inputs.get(b.id)
                pointers[b.id] = int(staged[2]) if staged else 0
        for alias, target in self.plan.aliases.items():
            pointers[alias] = pointers[target]
        code = self._code
        tail = [int(frame.dims), int(code.status)]
        # A kernel's last argument is what a failed check writes: the graph and the launch.
        graph = list(code.executors.values()).index(self) << 16
        assert len(self._launches) < 1 << 16, "internal error: too many launches to number"
        slot.launches = [(code.functions[launch.kernel], grid, block,
                          [pointers[b] for b in launch.buffers] + tail + [graph | launch.index])
                         for launch, grid, block in zip(self._launches, frame.grids, frame.blocks)]
        slot.copies_back = [(host, pointers[buf] + offset * host.itemsize)
                            for offset, buf, host, size, _ in slot.outputs.values() if all(size)]
        slot.made_at = self._code.uploads

    def _resident(self, drv, name: str, array: np.ndarray) -> int:
        """The device address of a parameter or state array, uploaded when the host array changed
        (a new object: assigned, loaded from a checkpoint). Edits made inside a host array
        (`w[:] = 0`) are not seen: assign a new array instead."""
        code = self._code
        held = code.resident.get(name)
        if held is None or held[0] is not array:
            if held is not None:        # the runs queued before may still read the old copy
                code.synchronize()
            held = (array, drv.to_device(np.ascontiguousarray(array)))
            code.resident[name] = held
            code.uploads += 1
        return int(held[1])

    @property
    def dirty(self) -> bool:
        return self._code.dirty

    def sync_to_host(self, params: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> None:
        """Copy the device's parameters and state into the host arrays the program holds, once
        the runs queued before have finished."""
        code = self._code
        if not code.dirty:
            return
        with code.lock, _current() as drv:
            code.synchronize()
            for name, (array, dev) in code.resident.items():
                target = params.get(name) if name in params else state.get(name)
                if target is array:
                    drv.memcpy_dtoh(array, dev)
            code.dirty = False


def _grid(launch: codegen.Launch, dims: dict[str, int]) -> tuple[int, int, int]:
    if launch.kind == "gemm":
        m, n = (sval(s, dims) for s in launch.work)
        return (max(1, -(-n // codegen.GEMM_BN)), max(1, -(-m // codegen.GEMM_BM)), 1)
    work = sum(sval(s, dims) for s in launch.work)
    threads = work * 32 if launch.kind == "rows" else work
    return (max(1, min(MAX_BLOCKS, -(-threads // codegen.BLOCK))), 1, 1)
