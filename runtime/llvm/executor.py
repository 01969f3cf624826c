"""The llvm executor: a graph's kernel plan compiled into one native function, called once per
run through ctypes (which releases the GIL), on buffers planned once per batch shape."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from graphc.errors import Diagnostic, GraphcError
from graphc.ir.node import Graph
from graphc.kernels import plan_kernels
from graphc.kernels.ir import sval
from graphc.kernels.memory import ALIGN, plan_arena
from graphc.runtime.llvm import jit
from graphc.runtime.llvm.codegen import render_module

_MAIN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p)


@dataclass
class _Frame:
    """Everything that depends on the batch shape: the arena and the pointer table."""
    arena: np.ndarray
    pointers: ctypes.Array
    dims: np.ndarray
    outputs: list                 # (name, external slot or None, ndarray view into the arena)

    @property
    def dims_address(self) -> int:
        return self.dims.ctypes.data


class LLVMExecutor:
    name = "llvm"

    def __init__(self, graph: Graph):
        self.graph = graph
        self.plan = plan_kernels(graph)
        self.externals = [(b.id, b.kind, b.name, b.dtype.numpy, b.id in self.plan.aliases.values())
                          for b in self.plan.buffers if b.kind != "temp"]
        self._fn = None
        self._frames: dict[tuple, _Frame] = {}
        self._seen: dict[int, object] = {}          # slot -> the array last pointed at
        self._status = np.zeros(3, dtype=np.int64)
        self._status_address = self._status.ctypes.data
        self._blas = (ctypes.c_void_p * 2)()
        self._checks: list[int] = []

    def source(self) -> str:
        text, self._checks = render_module(self.plan, jit.blas()[2])
        return text

    def compile(self) -> None:
        if self._fn is None:
            text = self.source()
            self._compiled = jit.Compiled(jit.object_code(text), "graph_main")
            self._fn = _MAIN(self._compiled.address)
            sgemm, dgemm, _ = jit.blas()
            self._blas[0], self._blas[1] = sgemm or None, dgemm or None

    def frame(self, dims: dict[str, int]) -> _Frame:
        key = tuple(dims.get(s, 0) for s in self.plan.symbols)
        frame = self._frames.get(key)
        if frame is None:
            arena = plan_arena(self.plan, dims)
            raw = np.empty(arena.size + ALIGN, dtype=np.uint8)
            shift = (-raw.ctypes.data) % ALIGN
            memory = raw[shift: shift + arena.size]
            pointers = (ctypes.c_void_p * len(self.plan.buffers))()
            base = memory.ctypes.data
            for b, off in arena.offsets.items():
                pointers[b] = base + off
            outputs = []
            slots = {b.id: b for b in self.plan.buffers}
            for name, access, shape, dtype in self.plan.outputs:
                buf = self.plan.aliases.get(access.buffer, access.buffer)
                if slots[buf].kind != "temp":
                    outputs.append((name, buf, _view_args(access, shape, dtype, dims)))
                else:
                    outputs.append((name, None, _arena_view(memory, arena.offsets[buf], access, shape,
                                                            dtype, dims)))
            frame = _Frame(memory, pointers, np.array(key, dtype=np.int64), outputs)
            self._frames[key] = frame
            self._seen = {}
        return frame

    def run(self, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray],
            dims: dict[str, int], state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        if self._fn is None:
            self.compile()
        frame = self.frame(dims)
        pointers, seen = frame.pointers, self._seen
        arrays = {}
        for slot, kind, name, dtype, written in self.externals:
            source = feeds if kind == "input" else params if kind == "param" else state
            array = source[name]
            if seen.get(slot) is not array:
                if not (isinstance(array, np.ndarray) and array.dtype == dtype
                        and array.flags.c_contiguous and (array.flags.writeable or not written)):
                    array = np.array(array, dtype=dtype, order="C")
                    if kind != "input":
                        source[name] = array     # the program keeps the array we update
                seen[slot] = array
                pointers[slot] = array.ctypes.data
            arrays[slot] = array
        status = self._status
        if self._fn(pointers, frame.dims_address, self._blas, self._status_address):
            raise self._failure(status)
        out = {}
        for name, slot, view in frame.outputs:
            if slot is None:
                out[name] = view.copy()
            elif name.startswith("new ") and slot in self.plan.aliases.values():
                out[name] = arrays[slot]       # updated in place
            else:
                flat = arrays[slot].reshape(-1)[view.pop("offset"):] if "offset" in view else arrays[slot]
                out[name] = np.lib.stride_tricks.as_strided(flat, **view).copy()
        return out

    def _failure(self, status: np.ndarray) -> GraphcError:
        code, value, check = (int(v) for v in status)
        status[:] = 0
        kernel = self.plan.kernels[self._checks[check - 1]]
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
