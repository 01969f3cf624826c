"""graphc primitives to standard ONNX ops, one handler per primitive (`HANDLERS`), and the
`Lowering` that walks a graph from its outputs, trying the fused patterns of `patterns.py` at a
node before its own handler. An op without a handler is refused with its `.nn` location."""
from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np

from graphc.errors import GraphcError, error
from graphc.files import source_line
from graphc.ir.node import Graph, Node
from graphc.ir.types import DType, dim_factors

# The ONNX element types of graphc's dtypes (onnx.TensorProto's numbers).
ONNX_DTYPES = {DType.f16: 10, DType.bf16: 16, DType.f32: 1, DType.f64: 11, DType.i32: 6,
               DType.i64: 7, DType.bool: 9}


class Lowering:
    """Builds the ONNX nodes of one graph. `sources(node)` names the ONNX value of an `input`,
    `param`, `state` or `uniform` node (the exporter decides which are graph inputs and which
    initializers); every other node is lowered on demand, so only what the outputs read is
    emitted and a value a pattern absorbed is not emitted on its own."""

    def __init__(self, helper, numpy_helper, graph: Graph, opset: int,
                 sources: Callable[[Node], str], patterns: dict[str, list] | None = None):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.graph, self.opset, self.sources = graph, opset, sources
        self.patterns = patterns or {}
        self.nodes: list = []
        self.initializers: list = []
        self.names: dict[int, str] = {}
        self.used: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.uses: dict[int, int] = {}
        for node in graph.nodes():
            for i in node.inputs:
                self.uses[id(i)] = self.uses.get(id(i), 0) + 1
        for _, node in graph.outputs:
            self.uses[id(node)] = self.uses.get(id(node), 0) + 1
        self.preferred: dict[int, str] = {}
        self.fused: dict[str, int] = {}          # ONNX op of each recognized pattern: count
        # The symbolic sizes, each as an axis of a graph input that has it (for shapes computed
        # at run time: reshapes, broadcasts and sizes over more than one symbolic axis).
        self.symbol_axes: dict[str, tuple[Node, int]] = {}
        for node in graph.nodes():
            if node.op in ("input", "param", "state"):
                for axis, d in enumerate(node.type.shape):
                    if isinstance(d, str) and "*" not in d:
                        self.symbol_axes.setdefault(d, (node, axis))

    # --- names and emission ---------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        base = base or "v"
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def single_use(self, node: Node) -> bool:
        """Whether `node` has one reader (and is no output): a pattern may absorb it."""
        return self.uses.get(id(node), 0) <= 1

    def emit(self, op_type: str, inputs: list[str], at: Node | None, out: str | None = None,
             **attrs) -> str:
        """One ONNX node; returns the name of its output. `at` gives the doc string (the `.nn`
        location) and the node name."""
        out = out or self.fresh(f"{op_type}")
        doc = ""
        if at is not None and at.loc is not None:
            doc = str(at.loc) + (f" ({', '.join(sorted(at.tags))})" if at.tags else "")
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out,
                                                doc_string=doc or None, **attrs))
        return out

    def const(self, value, dtype: np.dtype | DType) -> str:
        """An initializer holding `value` (deduplicated)."""
        if isinstance(dtype, DType):
            dtype = dtype.numpy
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh(f"const:{array.item()}" if array.size == 1 else "const")
            self.initializers.append(self.numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values) -> str:
        return self.const(np.asarray(list(values), np.int64), np.dtype(np.int64))

    def value(self, node: Node) -> str:
        """The ONNX value of `node`, lowering it (and what it reads) on first use."""
        name = self.names.get(id(node))
        if name is not None:
            return name
        if node.type.dtype is DType.bf16:
            raise refuse(node, f"{node.label()} is bf16, which this exporter does not write "
                               f"(numpy, which holds the values, has no bf16)")
        limit, previous = 4 * len(self.graph.nodes()) + 1000, sys.getrecursionlimit()
        if previous >= limit:
            return self._lower(node)
        # Lowering recurses into a node's inputs: a deep graph needs a deeper stack, for this
        # call only (the process's limit is put back).
        sys.setrecursionlimit(limit)
        try:
            return self._lower(node)
        finally:
            sys.setrecursionlimit(previous)

    def _lower(self, node: Node) -> str:
        if node.op in ("input", "param", "state") or (node.op == "uniform" and self.opset < 18):
            name = self.sources(node)
        elif node.op == "const":
            name = self.const(node.attr["value"], node.type.dtype)
        else:
            name = None
            for pattern in self.patterns.get(node.op, ()):
                name = pattern(self, node)
                if name is not None:
                    self.fused[pattern.onnx_op] = self.fused.get(pattern.onnx_op, 0) + 1
                    break
            if name is None:
                handler = HANDLERS.get(node.op)
                if handler is None:
                    why = UNSUPPORTED.get(node.op)
                    raise refuse(node, f"the op `{node.op}` has no ONNX lowering"
                                       + (f" ({why})" if why else ""))
                name = handler(self, node, [self.value(i) for i in node.inputs])
        self.names[id(node)] = name
        return name

    def out_name(self, node: Node) -> str | None:
        """The name a node's value should get: the graph output's it is, else its .nn name."""
        if id(node) in self.preferred:
            return self.preferred.pop(id(node))
        return self.fresh(node.name) if node.name else None

    # --- shapes known at run time ---------------------------------------------------------------

    def dims(self, shape, at: Node) -> str:
        """A 1-D int64 tensor of `shape`, its symbolic sizes read from the graph inputs."""
        parts, known = [], []
        for d in shape:
            coef, syms = dim_factors(d)
            if not syms:
                known.append(coef)
                continue
            if known:
                parts.append(self.ints(known))
                known = []
            size = self.ints([coef])
            for s in syms:
                if s not in self.symbol_axes:
                    raise refuse(at, f"the size {s} is not the size of an axis of any input")
                src, axis = self.symbol_axes[s]
                dim = self.emit("Shape", [self.value(src)], at, start=axis, end=axis + 1)
                size = self.emit("Mul", [size, dim], at)
            parts.append(size)
        if known:
            parts.append(self.ints(known))
        return parts[0] if len(parts) == 1 else self.emit("Concat", parts, at, axis=0)

    def reshape(self, x: str, shape, at: Node, out: str | None = None) -> str:
        symbolic = [i for i, d in enumerate(shape) if isinstance(d, str)]
        if len(symbolic) <= 1:
            target = self.ints(-1 if isinstance(d, str) else d for d in shape)
        else:
            target = self.dims(shape, at)
        return self.emit("Reshape", [x, target], at, out)

    def reduce(self, op_type: str, x: str, axes, keepdims: bool, at: Node, out: str | None = None) -> str:
        """ReduceSum/Mean/Max/Prod over `axes` (None: all); axes are an input from opset 13 for
        ReduceSum, 18 for the others."""
        keep = int(bool(keepdims))
        if axes is None:
            return self.emit(op_type, [x], at, out, keepdims=keep)
        axes = [int(a) for a in (axes if isinstance(axes, tuple) else (axes,))]
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.emit(op_type, [x, self.ints(axes)], at, out, keepdims=keep)
        return self.emit(op_type, [x], at, out, axes=axes, keepdims=keep)


def refuse(node: Node, message: str) -> GraphcError:
    """The error of graph content ONNX export cannot express, at the node's `.nn` location."""
    return error(f"cannot export to ONNX: {message}", node.loc, line_text=source_line(node.loc),
                 hint="docs/onnx.md lists what export supports")


# --- one handler per primitive ------------------------------------------------------------------

def _simple(op_type: str):
    def handler(lw: Lowering, node: Node, ins: list[str]) -> str:
        return lw.emit(op_type, ins, node, lw.out_name(node))
    return handler


HANDLERS: dict[str, Callable[[Lowering, Node, list[str]], str]] = {
    name: _simple(op) for name, op in [
        ("neg", "Neg"), ("exp", "Exp"), ("log", "Log"), ("sqrt", "Sqrt"), ("abs", "Abs"),
        ("tanh", "Tanh"), ("erf", "Erf"), ("sigmoid", "Sigmoid"), ("relu", "Relu"),
        ("stop_gradient", "Identity"), ("add", "Add"), ("sub", "Sub"), ("mul", "Mul"),
        ("div", "Div"), ("pow", "Pow"), ("maximum", "Max"), ("minimum", "Min"),
        ("greater", "Greater"), ("greater_equal", "GreaterOrEqual"), ("less", "Less"),
        ("less_equal", "LessOrEqual"), ("equal", "Equal"), ("where", "Where"),
        ("matmul", "MatMul"),
        # An exported model runs as one process, the group of one where an all-reduce (of a
        # train step built for N ranks) is the identity; docs/onnx.md says so.
        ("all_reduce", "Identity")]}

# The source ops, named by the exporter (graph inputs or initializers) or written as constants
# in Lowering.value, not by a handler; composites are decomposed before export.
SOURCES = frozenset({"input", "param", "state", "const"})
# Primitives export refuses, with the reason; every primitive of graphc.ir.OPS is in HANDLERS,
# SOURCES or here, or is a composite (tests/test_onnx_export.py checks it).
UNSUPPORTED: dict[str, str] = {}


def handler(op: str):
    def register(fn):
        HANDLERS[op] = fn
        return fn
    return register


@handler("log1p")
def _log1p(lw, node, ins):
    return lw.emit("Log", [lw.emit("Add", [ins[0], lw.const(1.0, node.dtype)], node)], node,
                   lw.out_name(node))


@handler("causal_mask")
def _causal_mask(lw, node, ins):
    # Where(keep, x, value) with keep a [T, S] constant (j <= i): attention's T is a size the
    # model fixes (its context), never the batch.
    t, s = node.shape[-2:]
    if not (isinstance(t, int) and isinstance(s, int)):
        raise refuse(node, f"{node.label()}: a causal mask over symbolic sizes [{t}, {s}] is not "
                           f"exported (ONNX needs its [T, S] keep-mask as a constant)")
    keep = lw.const(np.arange(s)[None, :] <= np.arange(t)[:, None], np.dtype(bool))
    fill = lw.const(node.attr["value"], node.dtype)
    return lw.emit("Where", [keep, ins[0], fill], node, lw.out_name(node))


@handler("not_equal")
def _not_equal(lw, node, ins):
    return lw.emit("Not", [lw.emit("Equal", ins, node)], node, lw.out_name(node))


@handler("cast")
def _cast(lw, node, ins):
    return lw.emit("Cast", ins, node, lw.out_name(node), to=ONNX_DTYPES[node.dtype])


@handler("one_hot")
def _one_hot(lw, node, ins):
    # Equal against 0..depth-1 then Cast: exact, and every runtime has both.
    y = lw.emit("Unsqueeze", [ins[0], lw.ints([-1])], node)
    depth = node.attr["depth"]
    classes = lw.const(np.arange(depth), node.inputs[0].dtype)
    return lw.emit("Cast", [lw.emit("Equal", [y, classes], node)], node, lw.out_name(node),
                   to=ONNX_DTYPES[node.dtype])


for _op, _onnx in [("sum", "ReduceSum"), ("mean", "ReduceMean"), ("max", "ReduceMax")]:
    def _reduction(lw, node, ins, _onnx=_onnx):
        return lw.reduce(_onnx, ins[0], node.attr["axis"], node.attr["keepdims"], node, lw.out_name(node))
    HANDLERS[_op] = _reduction


@handler("reshape")
def _reshape(lw, node, ins):
    return lw.reshape(ins[0], node.shape, node, lw.out_name(node))


@handler("transpose")
def _transpose(lw, node, ins):
    axes = node.attr["axes"]
    ndim = node.inputs[0].type.ndim
    if axes is None:
        perm = list(reversed(range(ndim)))
    else:
        perm = [a % ndim for a in (axes if isinstance(axes, tuple) else (axes,))]
    return lw.emit("Transpose", ins, node, lw.out_name(node), perm=perm)


@handler("concat")
def _concat(lw, node, ins):
    return lw.emit("Concat", ins, node, lw.out_name(node), axis=int(node.attr["axis"]))


@handler("pad")
def _pad(lw, node, ins):
    pads = list(node.attr["low"]) + list(node.attr["high"])
    value = lw.const(node.attr["value"], node.dtype)
    return lw.emit("Pad", [ins[0], lw.ints(pads), value], node, lw.out_name(node), mode="constant")


@handler("broadcast_to")
def _broadcast_to(lw, node, ins):
    # Expand broadcasts the operand against the shape given: a 1 there keeps the operand's size,
    # so an axis the operand already has needs no size known at run time.
    src = node.inputs[0].type.shape
    target = list(node.attr["shape"])
    offset = len(target) - len(src)
    shape = [1 if i >= offset and src[i - offset] == d else d for i, d in enumerate(target)]
    if any(isinstance(d, str) for d in shape):
        dims = lw.dims(shape, node)
    else:
        dims = lw.ints(shape)
    return lw.emit("Expand", [ins[0], dims], node, lw.out_name(node))


@handler("slice")
def _slice(lw, node, ins):
    axis = int(node.attr["axis"]) % node.inputs[0].type.ndim
    return lw.emit("Slice", [ins[0], lw.ints([node.attr["start"]]), lw.ints([node.attr["stop"]]),
                             lw.ints([axis])], node, lw.out_name(node))


@handler("size")
def _size(lw, node, ins):
    x = node.inputs[0].type
    axes = node.attr["axis"]
    axes = range(x.ndim) if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    sizes = [x.shape[a] for a in axes]
    if all(isinstance(d, int) for d in sizes):
        return lw.const(math.prod(sizes), node.dtype)
    count = lw.reduce("ReduceProd", lw.dims(sizes, node), None, False, node)
    return lw.emit("Cast", [count], node, lw.out_name(node), to=ONNX_DTYPES[node.dtype])


def _window_positions(size, kernel, stride, dilation) -> np.ndarray:
    """The flat index into the last axes (of `size`) of each element of the windows: an array
    shaped out + kernel, what `window` reads."""
    from graphc.ir.primitives import window_out
    k = len(kernel)
    out = tuple(window_out(*t) for t in zip(size, kernel, stride, dilation))
    grids = np.meshgrid(*[np.arange(n) for n in out + tuple(kernel)], indexing="ij")
    flat = np.zeros(out + tuple(kernel), np.int64)
    for a in range(k):
        coord = grids[a] * stride[a] + grids[k + a] * dilation[a]
        flat = flat * size[a] + coord
    return flat


@handler("window")
def _window(lw, node, ins):
    # The sliding windows as a Gather of the flattened window axes at constant positions.
    x = node.inputs[0].type
    kernel, stride, dilation = (tuple(node.attr[a]) for a in ("kernel", "stride", "dilation"))
    k = len(kernel)
    lead, size = x.shape[: x.ndim - k], x.shape[x.ndim - k:]
    flat = lw.emit("Reshape", [ins[0], lw.ints([0] * len(lead) + [math.prod(size)])], node)
    positions = lw.const(_window_positions(size, kernel, stride, dilation), np.dtype(np.int64))
    return lw.emit("Gather", [flat, positions], node, lw.out_name(node), axis=len(lead))


@handler("window_add")
def _window_add(lw, node, ins):
    # The adjoint of window: each window element added back at its position, a ScatterElements
    # with reduction "add" into zeros over the flattened window axes.
    g = node.inputs[0].type
    kernel, stride, dilation = (tuple(node.attr[a]) for a in ("kernel", "stride", "dilation"))
    size = tuple(node.attr["size"])
    k = len(kernel)
    lead = g.ndim - 2 * k
    positions = _window_positions(size, kernel, stride, dilation).reshape(-1)
    flat = lw.emit("Reshape", [ins[0], lw.ints([0] * lead + [positions.size])], node)
    index = lw.emit("Expand", [lw.const(positions.reshape((1,) * lead + (-1,)), np.dtype(np.int64)),
                               lw.emit("Shape", [flat], node)], node)
    zeros_shape = lw.emit("Concat", [lw.emit("Shape", [flat], node, start=0, end=lead),
                                     lw.ints([math.prod(size)])], node, axis=0)
    zeros = lw.emit("ConstantOfShape", [zeros_shape], node,
                    value=lw.numpy_helper.from_array(np.zeros(1, node.dtype.numpy)))
    summed = lw.emit("ScatterElements", [zeros, index, flat], node, axis=lead, reduction="add")
    return lw.emit("Reshape", [summed, lw.ints([0] * lead + list(size))], node, lw.out_name(node))


# --- dropout's draws, from opset 18: graphc's counter-based hash in 32-bit integer ops ----------

def _hash32(lw: Lowering, x: str, at: Node) -> str:
    """lowbias32 (graphc.ir.primitives.hash32) on uint32 values."""
    u32 = np.dtype(np.uint32)
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
        x = lw.emit("BitwiseXor", [x, lw.emit("BitShift", [x, lw.const(shift, u32)], at,
                                               direction="RIGHT")], at)
        if factor is not None:
            x = lw.emit("Mul", [x, lw.const(factor, u32)], at)
    return x


@handler("uniform")
def _uniform(lw, node, ins):
    # graphc.ir.primitives._uniform: element i is hash(hash(i ^ w0) ^ w1) >> 8, times 2^-24, the
    # words w0, w1 hashed from the key and the stream (draw_words). BitwiseXor needs opset 18;
    # before it the exporter makes the draws graph inputs instead.
    from graphc.ir.primitives import hash32
    if lw.opset < 18:
        raise refuse(node, "dropout's draws need opset 18 or newer to be computed in the graph")
    u32, u64 = np.dtype(np.uint32), np.dtype(np.uint64)
    key = lw.emit("Cast", ins, node, to=13)                                  # uint64
    low = lw.emit("Cast", [lw.emit("BitwiseAnd", [key, lw.const(0xFFFFFFFF, u64)], node)], node, to=12)
    high = lw.emit("Cast", [lw.emit("BitShift", [key, lw.const(32, u64)], node, direction="RIGHT")],
                   node, to=12)
    stream = int(node.attr["stream"])
    w0 = _hash32(lw, lw.emit("BitwiseXor", [low, lw.const(hash32(stream + 0x9E3779B9), u32)], node), node)
    w1 = _hash32(lw, lw.emit("BitwiseXor", [_hash32(lw, lw.emit("Add", [high, lw.const(0x632BE5AB, u32)],
                                                                   node), node), w0], node), node)
    shape = node.type.shape
    if all(isinstance(d, int) for d in shape):
        count = lw.const(math.prod(shape), np.dtype(np.int64))
    else:
        count = lw.reduce("ReduceProd", lw.dims(shape, node), None, False, node)
    index = lw.emit("Cast", [lw.emit("Range", [lw.const(0, np.dtype(np.int64)), count,
                                              lw.const(1, np.dtype(np.int64))], node)], node, to=12)
    bits = _hash32(lw, lw.emit("BitwiseXor", [_hash32(lw, lw.emit("BitwiseXor", [index, w0], node), node),
                                              w1], node), node)
    top = lw.emit("BitShift", [bits, lw.const(8, u32)], node, direction="RIGHT")
    # The top 24 bits are exact in f32 and f64, and so is the scaling; f16 rounds once from f64.
    wide = DType.f64 if node.dtype not in (DType.f32, DType.f64) else node.dtype
    value = lw.emit("Mul", [lw.emit("Cast", [top], node, to=ONNX_DTYPES[wide]),
                            lw.const(2.0 ** -24, wide)], node)
    if wide is not node.dtype:
        value = lw.emit("Cast", [value], node, to=ONNX_DTYPES[node.dtype])
    if any(isinstance(d, str) for d in shape):
        return lw.emit("Reshape", [value, lw.dims(shape, node)], node, lw.out_name(node))
    return lw.emit("Reshape", [value, lw.ints(shape)], node, lw.out_name(node))
