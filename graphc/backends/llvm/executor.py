"""The llvm executor: a graph's kernel plan compiled into one native function, called once per
run through ctypes (which releases the GIL), on buffers planned once per batch shape. The graphs
of a program are compiled together, as one module (`LLVMExecutor.link`), in as many parts as
there are cores to compile them at once."""
from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphc.backends.kernels import plan_kernels
from graphc.backends.kernels.ir import sprod, sval
from graphc.backends.kernels.memory import ALIGN, plan_arena
from graphc.backends.kernels.tables import check_lowerable
from graphc.backends.llvm import blas, gemm, jit, threads
from graphc.backends.llvm.lowering import LOWER, UNSUPPORTED
from graphc.errors import Diagnostic, GraphcError
from graphc.ir.contract import Update
from graphc.ir.node import Graph


class _Code:
    """The native code of linked executors: one module, compiled (or read from the cache) once."""

    def __init__(self, executors: dict[str, LLVMExecutor]):
        self.executors = executors
        self.timed = any(ex.timed for ex in executors.values())
        self._module = None
        self._identity: str | None = None
        self._compiled = None

    def module(self):
        """The rendered module (codegen's `Module`): its functions, graph_main functions and
        declarations."""
        if self._module is None:
            from graphc.backends.llvm.codegen import build_module  # not needed on a cache hit
            plans = {key: ex.plan for key, ex in self.executors.items()}
            self._module = build_module(plans, jit.blas().int_bits, self.timed)
        return self._module

    def text(self) -> str:
        return self.module().text()

    def parts(self) -> list[str]:
        return module_parts(self.module(), jit.compile_threads())

    def identity(self) -> str:
        """What the module is generated from: the plans (their repr is complete, deterministic
        and a fifth of the cost of rendering them) and the BLAS's integer width. Taken once: every
        linked executor asks for it."""
        if self._identity is None:
            plans = {key: ex.plan for key, ex in self.executors.items()}
            self._identity = (f"blas int{jit.blas().int_bits} gemm {gemm.mode()} {gemm.wanted()}"
                              + (" timed" if self.timed else "")
                              + f"\n{plans!r}")
        return self._identity

    def compile(self, load: bool = True) -> None:
        if self._compiled is not None:
            return
        if not load:                  # only make sure the object code is in the cache
            jit.module_objects(self.identity(), self.parts, need=False)
            return
        self._compiled = jit.Compiled(*jit.module_objects(self.identity(), self.parts))
        blas = jit.blas()
        pool = threads.pool_address(self._compiled) if threads.enabled() else None
        for key, ex in self.executors.items():
            ex._fn = _MAIN(self._compiled.address(f"graph_main_{key}"))
            ex._blas[:] = [blas.sgemm or None, blas.dgemm or None, pool]
            # with or without the pool (GRAPHC_THREADS=1): the same calls, so the same results;
            # used by the frames that have a large product (_Frame.big_products)
            ex._blas_threads = threads.one_blas_thread(blas.threads) if blas.threads else None


# Fewer functions than this per part, and a part costs more (a context, a target machine, a pass
# pipeline set up, an object file loaded) than compiling it beside the others saves.
MIN_FUNCTIONS_PER_PART = 8
_DEFINE = re.compile(r"^define internal (\S+) @([\w.]+)\(([^)]*)\)", re.MULTILINE)


def module_parts(module, most: int) -> list[str]:
    """The rendered module as IR modules to compile at once, at most `most`: its functions (the
    kernels and the graph_main functions) dealt out, longest first, to the shortest part. In
    parts, the kernels are not `internal`, so a graph_main can call one in another part; each
    part declares the kernels it does not define. One part is the module's own text."""
    functions = dict(module.functions)
    functions.update((f"main {i}", text) for i, text in enumerate(module.mains))
    count = min(most, len(functions) // MIN_FUNCTIONS_PER_PART)
    if count <= 1:
        return [module.text()]
    signatures = {}
    for name, text in module.functions.items():
        ret, symbol, params = _DEFINE.search(text).groups()
        assert symbol == name, f"internal error: function {name} is defined as {symbol}"
        types = ", ".join(p.split()[0] for p in params.split(", ") if p)
        signatures[name] = f"declare {ret} @{name}({types})"
        functions[name] = text.replace("define internal ", "define ", 1)
    parts: list[list[str]] = [[] for _ in range(count)]
    sizes = [0] * count
    for name in sorted(functions, key=lambda n: -len(functions[n])):
        smallest = sizes.index(min(sizes))
        parts[smallest].append(name)
        sizes[smallest] += len(functions[name])
    declarations = sorted(module.declarations.values())
    texts = []
    for names in parts:
        defined = set(names)
        elsewhere = [signatures[n] for n in signatures if n not in defined]
        texts.append("\n".join(["; graphc: generated LLVM IR, a part", ""] + declarations + elsewhere
                               + [""] + [functions[n] for n in names]))
    return texts


_MAIN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p)


@dataclass
class _Frame:
    """Everything that depends on the batch shape: the arena, the pointer table, the outputs."""
    arena: np.ndarray
    pointers: ctypes.Array
    dims: np.ndarray
    dims_address: int
    temp_outputs: list            # (name, view into the arena): copied out after each run
    external_outputs: list        # (name, slot, as_strided arguments): outputs that are views of inputs
    seen: dict                    # slot -> the array its pointer was taken from
    big_products: bool = False    # a product of PARALLEL_BLAS or more (OpenBLAS to one thread)


class LLVMExecutor:
    """Runs one graph. Outputs that the plan writes in place into a parameter or state array
    (`new W` of a train step) are not returned: the arrays passed in hold them after the call."""

    name = "llvm"
    source_suffix = ".ll"

    def __init__(self, graph: Graph, updates: Sequence[Update] = (), timed: bool = False):
        """`updates`: the train step's contract (graphc.ir.contract), written in place. `timed`:
        compiled to time every kernel (`kernel_seconds` after each run; `graphc time`)."""
        self.graph = graph
        self.timed = timed
        check_lowerable(graph, "llvm", LOWER, UNSUPPORTED)
        self.plan = plan_kernels(graph, updates, ordered=True)
        in_place = set(self.plan.aliases.values())
        self.scalar_inputs = []       # 0-d inputs (#lr, #rng) are copied into buffers of our own
        self.array_inputs = []
        self.owned = []               # params and state: pointers taken again only when replaced
        for b in self.plan.buffers:
            if b.kind == "input" and not b.shape:
                self.scalar_inputs.append((b.id, b.name, np.zeros((), dtype=b.dtype.numpy)))
            elif b.kind == "input":
                self.array_inputs.append((b.id, b.name, b.dtype.numpy))
            elif b.kind in ("param", "state"):
                self.owned.append((b.id, b.name, b.kind == "param", b.dtype.numpy, b.id in in_place))
        self._output_order = [name for name, _, _, _ in self.plan.outputs]
        self.in_place = {name for name, access, _, _ in self.plan.outputs
                         if self.plan.aliases.get(access.buffer) in in_place}
        self._fn = None
        self._code = _Code({"graph": self})
        self._frames: dict[tuple, _Frame] = {}
        self._status = np.zeros(3 + (len(self.plan.kernels) + 1 if timed else 0), dtype=np.int64)
        self._status_address = self._status.ctypes.data
        self._blas = (ctypes.c_void_p * 3)()     # sgemm, dgemm, the kernels' thread pool
        self._blas_threads = None                # OpenBLAS single-threaded while this runs
        self._lock = threading.Lock()

    @classmethod
    def link(cls, executors: dict[str, LLVMExecutor]) -> None:
        """Compile these executors' graphs together (a program's graphs share many kernels)."""
        code = _Code(executors)
        for ex in executors.values():
            ex._code = code

    def source(self) -> str:
        """The LLVM IR of the module this graph is compiled in."""
        return self._code.text()

    def cached_object(self) -> str:
        """Where the module's object code is cached, relative to the cache folder."""
        return jit.object_name(self._code.identity())

    def compile(self, load: bool = True) -> None:
        """Compile the module (or read it from the cache) and load it; with `load=False`, only
        make sure the cache holds it."""
        self._code.compile(load)

    def frame(self, dims: dict[str, int]) -> _Frame:
        key = tuple(dims.get(s, 0) for s in self.plan.symbols)
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = self._new_frame(dims, key)
        return frame

    def _new_frame(self, dims: dict[str, int], key: tuple) -> _Frame:
        arena = plan_arena(self.plan, dims)
        raw = np.empty(arena.size + ALIGN, dtype=np.uint8)
        shift = (-raw.ctypes.data) % ALIGN
        memory = raw[shift: shift + arena.size]
        pointers = (ctypes.c_void_p * len(self.plan.buffers))()
        base = memory.ctypes.data
        for b, off in arena.offsets.items():
            pointers[b] = base + off
        for slot, _, value in self.scalar_inputs:
            pointers[slot] = value.ctypes.data
        temps, externals = [], []
        kinds = {b.id: b.kind for b in self.plan.buffers}
        for name, access, shape, dtype in self.plan.outputs:
            buf = self.plan.aliases.get(access.buffer, access.buffer)
            if name in self.in_place:
                continue
            if kinds[buf] == "temp":
                temps.append((name, _arena_view(memory, arena.offsets[buf], access, shape, dtype, dims)))
            else:
                externals.append((name, buf, _view_args(access, shape, dtype, dims)))
        dims_array = np.array(key, dtype=np.int64)
        big = any(k.matmul is not None and sval(sprod(k.space), dims) >= blas.PARALLEL_BLAS
                  for k in self.plan.kernels)
        return _Frame(memory, pointers, dims_array, dims_array.ctypes.data, temps, externals, {}, big)

    def run(self, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray],
            dims: dict[str, int], state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        # The native call releases the GIL; the arena and pointer table serve one run at a time.
        with self._lock:
            return self._run(feeds, params, dims, state)

    def _run(self, feeds, params, dims, state) -> dict[str, np.ndarray]:
        if self._fn is None:
            self.compile()
        frame = self.frame(dims)
        pointers, seen = frame.pointers, frame.seen
        for _, name, value in self.scalar_inputs:
            value[()] = feeds[name]
        arrays = {}
        for slot, name, dtype in self.array_inputs:
            array = feeds[name]
            if seen.get(slot) is not array:       # the same array object keeps its address
                if array.dtype != dtype or not array.flags.c_contiguous:
                    array = np.ascontiguousarray(array, dtype=dtype)
                seen[slot] = array
                pointers[slot] = array.ctypes.data
            arrays[slot] = array
        for slot, name, is_param, dtype, written in self.owned:
            source = params if is_param else state
            array = source[name]
            if seen.get(slot) is not array:
                if not (isinstance(array, np.ndarray) and array.dtype == dtype
                        and array.flags.c_contiguous and (array.flags.writeable or not written)):
                    array = source[name] = np.array(array, dtype=dtype, order="C")
                seen[slot] = array
                pointers[slot] = array.ctypes.data
        if self._blas_threads is None or not frame.big_products:
            failed = self._fn(pointers, frame.dims_address, self._blas, self._status_address)
        else:
            with self._blas_threads:
                failed = self._fn(pointers, frame.dims_address, self._blas, self._status_address)
        if failed:
            raise self._failure(self._status)
        out = {name: view.copy() for name, view in frame.temp_outputs}
        for name, slot, view in frame.external_outputs:
            array = arrays.get(slot)
            if array is None:
                array = self._external(slot, params, state)
            args = dict(view)
            flat = array.reshape(-1)[args.pop("offset"):]
            out[name] = np.lib.stride_tricks.as_strided(flat, **args).copy()
        if frame.external_outputs:       # in the graph's order, as the numpy backend returns them
            out = {name: out[name] for name in self._output_order if name in out}
        return out

    def kernel_ticks(self) -> np.ndarray:
        """The cycle counter ticks each kernel of the last run took (a timed executor)."""
        assert self.timed, "internal error: kernel times need an executor built timed"
        return np.diff(self._status[3:])

    def ticks_per_second(self, seconds: float = 0.05) -> float:
        """The cycle counter's rate (a timed executor), measured against the host's clock."""
        import time
        ticks = ctypes.CFUNCTYPE(ctypes.c_int64)(self._code._compiled.address("graphc_ticks"))
        t0, c0 = time.perf_counter(), ticks()
        while time.perf_counter() - t0 < seconds:
            pass
        t1, c1 = time.perf_counter(), ticks()
        return (c1 - c0) / (t1 - t0)

    def _external(self, slot: int, params: dict, state: dict | None) -> np.ndarray:
        for s, _, value in self.scalar_inputs:
            if s == slot:
                return value.copy()
        for s, name, is_param, _, _ in self.owned:
            if s == slot:
                return (params if is_param else state)[name]
        raise AssertionError(f"internal error: no buffer {slot}")

    def _failure(self, status: np.ndarray) -> GraphcError:
        _, value, index = (int(v) for v in status)     # code 1: a label out of range
        status[:] = 0
        kernel = self.plan.kernels[index]
        node = next(n for n in kernel.nodes if n.op == "one_hot")
        depth = node.attr["depth"]
        what = f" (computing {node.name})" if node.name else ""
        return GraphcError(Diagnostic(f"{node.op}{what}: class label {value} is out of range "
                                      f"[0, {depth})", node.loc))


def _view_args(access, shape, dtype, dims) -> dict:
    size = dtype.numpy.itemsize
    offset = sum(sval(t, dims) for t in access.offset)
    return {"shape": tuple(sval(s, dims) for s in shape),
            "strides": tuple(sval(s, dims) * size for s in access.strides), "offset": offset}


def _arena_view(memory, byte_offset, access, shape, dtype, dims) -> np.ndarray:
    args = _view_args(access, shape, dtype, dims)
    flat = memory[byte_offset:].view(dtype.numpy)
    return np.lib.stride_tricks.as_strided(flat[args.pop("offset"):], **args)
