"""The llvm executor: a graph's kernel plan compiled into one native function, called once per
run through ctypes (which releases the GIL), on buffers planned once per batch shape. The graphs
of a program are compiled together, as one module (`LLVMExecutor.link`)."""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

from graphc.errors import Diagnostic, GraphcError
from graphc.ir.node import Graph
from graphc.kernels import plan_kernels
from graphc.kernels.ir import sval
from graphc.kernels.memory import ALIGN, plan_arena
from graphc.runtime.llvm import jit


class _Code:
    """The native code of linked executors: one module, compiled (or read from the cache) once."""

    def __init__(self, executors: dict[str, LLVMExecutor]):
        self.executors = executors
        self._text: str | None = None
        self._compiled = None

    def text(self) -> str:
        if self._text is None:
            from graphc.runtime.llvm.codegen import render_module  # not needed on a cache hit
            plans = {key: ex.plan for key, ex in self.executors.items()}
            self._text = render_module(plans, jit.blas().int_bits)
        return self._text

    def identity(self) -> str:
        """What the module is generated from: the plans (their repr is complete, deterministic
        and a fifth of the cost of rendering them) and the BLAS's integer width."""
        plans = {key: ex.plan for key, ex in self.executors.items()}
        return f"blas int{jit.blas().int_bits}\n{plans!r}"

    def compile(self, load: bool = True) -> None:
        if self._compiled is not None:
            return
        if not load:                  # only make sure the object code is in the cache
            jit.object_code(self.identity(), self.text, need=False)
            return
        self._compiled = jit.Compiled(jit.object_code(self.identity(), self.text))
        blas = jit.blas()
        for key, ex in self.executors.items():
            ex._fn = _MAIN(self._compiled.address(f"graph_main_{key}"))
            ex._blas[:] = [blas.sgemm or None, blas.dgemm or None]


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


class LLVMExecutor:
    """Runs one graph. Outputs that the plan writes in place into a parameter or state array
    (`new W` of a train step) are not returned: the arrays passed in hold them after the call."""

    name = "llvm"
    source_suffix = ".ll"

    def __init__(self, graph: Graph):
        self.graph = graph
        self.plan = plan_kernels(graph)
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
        self._status = np.zeros(3, dtype=np.int64)
        self._status_address = self._status.ctypes.data
        self._blas = (ctypes.c_void_p * 2)()
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
        return _Frame(memory, pointers, dims_array, dims_array.ctypes.data, temps, externals, {})

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
        if self._fn(pointers, frame.dims_address, self._blas, self._status_address):
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
