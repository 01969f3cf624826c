"""The cuda executor: a graph's kernel plan rendered as CUDA C (codegen.py), compiled with nvcc for
the GPU's own architecture (cached on disk), and replayed launch by launch through pycuda.

Planning and rendering need no GPU and no pycuda (`graphc build --backend cuda --emit-source`
works anywhere); pycuda, a driver and a GPU are needed from the first compile or run on, and a
missing one is one clear sentence (`CudaUnavailable`).

Memory: parameters and optimizer state live on the device from their first use and are updated
there in place (`new W` outputs are not returned, as on the llvm backend); the host arrays are
brought up to date when the program reads them (`sync_to_host`). Temporaries live in one device
arena per batch shape. A run is asynchronous up to its one synchronization at the end: the batch
is staged in page-locked host memory and copied up on the executor's stream, the launches follow
on that stream (the copy of one input runs while the host stages the next), the outputs come back
into page-locked buffers, and only then does the host wait (the failed-check word and the loss
come back together). The device's context is made current around each use, so any thread may
call.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import threading

import numpy as np

from graphc.cache import cache_dir
from graphc.errors import Diagnostic, GraphcError
from graphc.ir.node import Graph
from graphc.kernels import plan_kernels
from graphc.kernels.ir import sval
from graphc.kernels.memory import ALIGN, plan_arena
from graphc.runtime.artifact import atomic_write
from graphc.runtime.cuda import codegen

MAX_BLOCKS = 65535 * 4


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
            hint="install it with `pip install 'graphc[cuda]'` on a machine with the CUDA toolkit "
                 "(it builds from source; see the README), or use --backend llvm" if missing
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
        names = {launch.kernel for launches in self.launches.values() for launch in launches}
        self.module = module
        self.stream = drv.Stream()
        self.functions = {name: module.get_function(name) for name in names}
        for key, ex in self.executors.items():
            ex._launches = self.launches[key]


class CUDAExecutor:
    name = "cuda"
    source_suffix = ".cu"

    def __init__(self, graph: Graph):
        self.graph = graph
        self.plan = plan_kernels(graph)
        self._code = _Code({"graph": self})
        self._launches: list[codegen.Launch] = []
        self._frames: dict[tuple, dict] = {}
        in_place = set(self.plan.aliases.values())
        # Updated in place on the device and not returned, except 0-d ones (the step count,
        # which the host needs for the next step's random key): eight bytes back.
        self.in_place = {name for name, access, shape, _ in self.plan.outputs
                         if self.plan.aliases.get(access.buffer) in in_place and shape}

    @classmethod
    def link(cls, executors: dict[str, CUDAExecutor], precision: str = "f32") -> None:
        """One module for the graphs of a program; `precision` "tf32" runs its f32 matrix
        products on the tensor cores (see docs/cuda.md for the tolerance)."""
        code = _Code(executors, precision)
        for ex in executors.values():
            ex._code = code

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

    def _frame(self, drv, dims: dict[str, int]) -> dict:
        """What runs at these sizes keep: the arena (planned on the launch order, see
        codegen.launched), the dims and status words, and page-locked staging for the inputs and
        outputs (one batch in flight at a time: each run ends synchronized)."""
        key = tuple(dims.get(s, 0) for s in self.plan.symbols)
        frame = self._frames.get(key)
        if frame is None:
            arena = plan_arena(codegen.launched(self.plan), dims)
            memory = drv.mem_alloc(max(arena.size, 1) + ALIGN)
            base = int(memory) + (-int(memory)) % ALIGN
            pointers = {b: base + off for b, off in arena.offsets.items()}
            dims_host = np.array([dims.get(s, 0) for s in self.plan.symbols] or [0], dtype=np.int64)
            inputs = {}
            for b in self.plan.buffers:
                count = sval(b.elements, dims)
                if b.kind == "input" and count:      # CUDA allocates no 0 bytes; no kernel reads it
                    host = drv.pagelocked_empty(count, b.dtype.numpy)
                    inputs[b.id] = (host, drv.mem_alloc(host.nbytes))
            frame = self._frames[key] = {
                "memory": memory, "pointers": pointers, "dims": drv.to_device(dims_host),
                "status": drv.mem_alloc(3 * 8), "status_host": drv.pagelocked_zeros(3, np.int64),
                "no_status": drv.pagelocked_zeros(3, np.int64),
                "inputs": inputs, "outputs": self._output_staging(drv, dims)}
        return frame

    def _output_staging(self, drv, dims: dict[str, int]) -> dict:
        """Per returned output: the span of its buffer it lies in (element offset, count), a
        page-locked buffer of that span, and its shape and strides within it."""
        staging = {}
        for name, access, shape, dtype in self.plan.outputs:
            if name in self.in_place:
                continue
            size = [sval(s, dims) for s in shape]
            strides = [sval(s, dims) for s in access.strides]
            offset = sum(sval(t, dims) for t in access.offset)
            span = 1 + sum((d - 1) * s for d, s in zip(size, strides)) if all(size) else 0
            host = drv.pagelocked_empty(max(span, 1), dtype.numpy)
            staging[name] = (offset, span, host, size, [s * host.itemsize for s in strides])
        return staging

    def _resident(self, drv, name: str, array: np.ndarray):
        """The device copy of a parameter or state array, uploaded when the host array changed
        (a new object: assigned, loaded from a checkpoint). Edits made inside a host array
        (`w[:] = 0`) are not seen: assign a new array instead."""
        held = self._code.resident.get(name)
        if held is None or held[0] is not array:
            held = (array, drv.to_device(np.ascontiguousarray(array)))
            self._code.resident[name] = held
        return held[1]

    @property
    def dirty(self) -> bool:
        return self._code.dirty

    def run(self, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray],
            dims: dict[str, int], state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        with self._code.lock, _current() as drv:
            return self._run(drv, feeds, params, dims, state or {})

    def _run(self, drv, feeds, params, dims, state) -> dict[str, np.ndarray]:
        self._code.compile(drv)
        stream = self._code.stream
        frame = self._frame(drv, dims)
        pointers = dict(frame["pointers"])
        for b in self.plan.buffers:
            if b.kind == "input":
                staged = frame["inputs"].get(b.id)
                if staged is None:
                    pointers[b.id] = 0
                    continue
                host, dev = staged
                np.copyto(host, np.asarray(feeds[b.name]).reshape(-1), casting="unsafe")
                drv.memcpy_htod_async(dev, host, stream)
                pointers[b.id] = int(dev)
            elif b.kind in ("param", "state"):
                source = params if b.kind == "param" else state
                pointers[b.id] = int(self._resident(drv, b.name, source[b.name]))
        for alias, target in self.plan.aliases.items():
            pointers[alias] = pointers[target]
        drv.memcpy_htod_async(frame["status"], frame["no_status"], stream)
        for launch in self._launches:
            fn = self._code.functions[launch.kernel]
            threads = codegen.GEMM_THREADS if launch.kind == "gemm" else codegen.BLOCK
            args = [np.uintp(pointers[b]) for b in launch.buffers]
            args += [np.uintp(int(frame["dims"])), np.uintp(int(frame["status"])), np.int32(launch.index)]
            fn(*args, block=(threads, 1, 1), grid=_grid(launch, dims), stream=stream)
        drv.memcpy_dtoh_async(frame["status_host"], frame["status"], stream)
        for name, (offset, span, host, _, _) in frame["outputs"].items():
            if span:
                access = next(a for n, a, _, _ in self.plan.outputs if n == name)
                buf = self.plan.aliases.get(access.buffer, access.buffer)
                drv.memcpy_dtoh_async(host, pointers[buf] + offset * host.itemsize, stream)
        stream.synchronize()            # the step's one wait
        self._code.dirty = self._code.dirty or bool(self.in_place)
        status = frame["status_host"]
        if status[0]:
            raise self._failure(status)
        return {name: np.lib.stride_tricks.as_strided(host, size, strides).copy()
                for name, (_, _, host, size, strides) in frame["outputs"].items()}

    def sync_to_host(self, params: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> None:
        """Copy the device's parameters and state into the host arrays the program holds."""
        code = self._code
        if not code.dirty:
            return
        with code.lock, _current() as drv:
            for name, (array, dev) in code.resident.items():
                target = params.get(name) if name in params else state.get(name)
                if target is array:
                    drv.memcpy_dtoh(array, dev)
            code.dirty = False

    def _failure(self, status: np.ndarray) -> GraphcError:
        _, value, index = (int(v) for v in status)     # code 1: a label out of range
        kernel = self.plan.kernels[index]
        node = next(n for n in kernel.nodes if n.op == "one_hot")
        what = f" (computing {node.name})" if node.name else ""
        return GraphcError(Diagnostic(f"{node.op}{what}: class label {value} is out of range "
                                      f"[0, {node.attr['depth']})", node.loc))


def _grid(launch: codegen.Launch, dims: dict[str, int]) -> tuple[int, int, int]:
    if launch.kind == "gemm":
        m, n = (sval(s, dims) for s in launch.work)
        return (max(1, -(-n // codegen.GEMM_BN)), max(1, -(-m // codegen.GEMM_BM)), 1)
    work = sum(sval(s, dims) for s in launch.work)
    threads = work * 32 if launch.kind == "rows" else work
    return (max(1, min(MAX_BLOCKS, -(-threads // codegen.BLOCK))), 1, 1)
