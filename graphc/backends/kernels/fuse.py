"""Fusion: a primitive graph becomes a short list of kernels over buffers.

Elementwise chains, the broadcasts they read, and the reductions they feed become one kernel each:
a node joins the kernel of its consumers when all of them are in that kernel and it has the kernel's
iteration shape, so nothing is computed twice and no intermediate array exists. Scalars (an
optimizer's bias corrections) are recomputed in every kernel that reads them. Layout ops
(transpose, broadcast, slice, most reshapes) cost nothing: they become strides of the accesses that
read them. Matrix products are kernels of their own that a backend may hand to a BLAS.
For a backend that runs a kernel's points in order (llvm: `ordered`), col2im (window_add) is one
kernel, a window_add of windows that do not overlap (pooling's gradient, after the rewrites of
windows.py) fuses into the kernel of what it scatters, and image results follow the axis order of
what they are computed from (a convolution's product gives [C, N, H, W]; see docs/backends.md,
"Convolutions").

Over 500 lines: one planner whose rules (grouping, layouts, the kernel of each op) share its
buffers and layouts; the rules are short methods, split by op.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from graphc.backends.kernels.ir import (
    ONE,
    ZERO,
    Access,
    Buffer,
    Const,
    FlatIndex,
    Index,
    Kernel,
    KernelPlan,
    Load,
    Offset,
    Op,
    SizeOf,
    Store,
    dims_of,
    offset_add,
    row_major,
    size_of,
    smul,
    sprod,
    stride_weight,
)
from graphc.backends.kernels.windows import exact_cover, rewrite_windows
from graphc.ir import OPS
from graphc.ir.contract import Update, bind_updates
from graphc.ir.node import Graph, Node
from graphc.ir.types import DType, symbols

FUSIBLE = ("elementwise", "random")
REDUCE = {"sum": "sum", "mean": "mean", "max": "max"}
EXTERNAL = ("input", "param", "state")


@dataclass(frozen=True)
class Layout:
    """Where a node's elements are: strides per axis of the node's shape, into a buffer."""
    buffer: int
    strides: tuple
    offset: Offset = ()


@dataclass
class _Group:
    anchor: Node
    space: tuple                 # the iteration shape (symbolic dims)
    reduce_axes: tuple[int, ...] = ()
    members: list[Node] = field(default_factory=list)


def _axes(node: Node) -> tuple[int, ...]:
    ndim = node.inputs[0].type.ndim
    axis = node.attr["axis"]
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in axes))


def _pointwise_reader(consumer: Node, ordered: bool = False) -> bool:
    """Does `consumer` read each element of its operands at its own position (so a producer of the
    same shape can be computed inline)? one_hot adds an axis, so it does not; a window_add of
    windows that do not overlap does, on an `ordered` backend (it puts each element in its place)."""
    kind = OPS[consumer.op].kind
    return ((kind in FUSIBLE and consumer.op != "one_hot") or consumer.op in REDUCE
            or (ordered and _scatters(consumer)))


def _scatters(node: Node) -> bool:
    """A window_add whose windows do not overlap (stride >= dilation * (kernel - 1) + 1): each
    image element gets at most one term."""
    if node.op != "window_add":
        return False
    a = node.attr
    return all(s >= d * (k - 1) + 1 for k, s, d in zip(a["kernel"], a["stride"], a["dilation"]))


class _Planner:
    def __init__(self, graph: Graph, ordered: bool = False):
        self.graph = graph
        self.ordered = ordered
        self.order = graph.nodes()
        self.position = {id(n): i for i, n in enumerate(self.order)}
        self.consumers: dict[int, list[Node]] = {id(n): [] for n in self.order}
        for n in self.order:
            for i in n.inputs:
                self.consumers[id(i)].append(n)
        self.output_ids = {id(n) for _, n in graph.outputs}
        self.buffers: list[Buffer] = []
        self.kernels: list[Kernel] = []
        self.values: dict[int, Layout | Const | SizeOf] = {}   # materialized nodes and scalars
        self.group_of: dict[int, _Group] = {}
        self.matrix_copies: dict[int, Layout] = {}              # products' operands copied in order
        self.duplicated: set[int] = set()                       # scalars recomputed where read
        self.symbols = sorted({s for n in self.order for s in symbols(n.shape)})

    # --- grouping ---------------------------------------------------------------------------------

    def group(self) -> list[_Group]:
        groups: list[_Group] = []
        for node in reversed(self.order):
            kind = OPS[node.op].kind
            if node.op in REDUCE:
                g = _Group(node, node.inputs[0].shape, _axes(node), [node])
                groups.append(g)
                self.group_of[id(node)] = g
            elif self.ordered and _scatters(node):
                g = _Group(node, node.inputs[0].shape, (), [node])
                groups.append(g)
                self.group_of[id(node)] = g
            elif kind in FUSIBLE:
                target = self._join_target(node)
                if target == "duplicate":
                    self.duplicated.add(id(node))
                elif target is not None:
                    target.members.append(node)
                    self.group_of[id(node)] = target
                else:
                    g = _Group(node, node.shape, (), [node])
                    groups.append(g)
                    self.group_of[id(node)] = g
        for g in groups:
            g.members.reverse()          # producers first
        groups.sort(key=lambda g: self.position[id(g.anchor)])
        return groups

    def _join_target(self, node: Node) -> _Group | str | None:
        users = self.consumers[id(node)]
        if not users or not all(_pointwise_reader(u, self.ordered) for u in users):
            return None     # graph outputs may join: the kernel stores them as well
        if node.shape == () and node.op != "uniform" and id(node) not in self.output_ids:
            return "duplicate"
        targets = {id(self.group_of.get(id(u))): self.group_of.get(id(u)) for u in users}
        if len(targets) != 1:
            return None
        (target,) = targets.values()
        if target is None or target.space != node.shape:
            return None
        return target

    # --- buffers and accesses ---------------------------------------------------------------------

    def new_buffer(self, node: Node, kind: str = "temp", name: str | None = None) -> int:
        buf = Buffer(len(self.buffers), node.dtype, dims_of(node.shape), kind, name)
        self.buffers.append(buf)
        return buf.id

    def contiguous(self, node: Node, buffer: int) -> Layout:
        return Layout(buffer, row_major(dims_of(node.shape)))

    def access(self, layout: Layout, shape: tuple, space: tuple, leading: bool = False) -> Access:
        """Read a value of `shape` at each point of `space`: broadcasting aligns trailing axes
        (leading ones for one_hot's labels), and axes of size 1 get stride 0."""
        pad = len(space) - len(shape)
        strides = []
        for k in range(len(space)):
            axis = k if leading else k - pad
            if axis < 0 or axis >= len(shape) or shape[axis] == 1:
                strides.append(ZERO)
            else:
                strides.append(layout.strides[axis])
        return Access(layout.buffer, tuple(strides), layout.offset)

    # --- kernels ----------------------------------------------------------------------------------

    def build(self) -> KernelPlan:
        for node in self.order:
            if node.op in EXTERNAL:
                self.values[id(node)] = self.contiguous(node, self.new_buffer(node, node.op,
                                                                             node.attr["name"]))
        groups = {id(g.anchor): g for g in self.group()}
        for node in self.order:
            if id(node) in self.values or id(node) in self.duplicated:
                continue
            if node.op == "const":
                self.values[id(node)] = Const(node.attr["value"], node.dtype)
            elif node.op == "size":
                self.values[id(node)] = self._size(node)
            elif id(node) in groups:
                self._fused_kernel(groups[id(node)])
            elif id(node) in self.group_of:
                continue                      # computed inside its group's kernel
            elif node.op == "matmul":
                self._matmul(node)
            elif node.op == "concat":
                self._concat(node)
            elif node.op == "pad":
                self._pad(node)
            elif node.op == "window_add":
                self._window_add(node)
            else:
                assert OPS[node.op].kind == "layout", f"internal error: no kernel rule for {node}"
                self.values[id(node)] = self._layout(node)
        outputs = [(name, *self._output(name, node)) for name, node in self.graph.outputs]
        return KernelPlan(self.graph.name, self.buffers, self.kernels, outputs, tuple(self.symbols))

    def _size(self, node: Node) -> Const | SizeOf:
        x = node.inputs[0]
        axis = node.attr["axis"]
        axes = range(x.type.ndim) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        count = sprod(size_of(x.shape[a]) for a in axes)
        return Const(count[0], node.dtype) if not count[1] else SizeOf(count, node.dtype)

    def _emit(self, name_hint: str, space: tuple, reduce_axes, loads, stores, nodes, matmul=None,
              window_axes: int = 0):
        kernel = Kernel(f"k{len(self.kernels)}_{name_hint}", dims_of(space), tuple(reduce_axes),
                        loads, stores, nodes, matmul, window_axes)
        self.kernels.append(kernel)
        return kernel

    def _fused_kernel(self, g: _Group) -> None:
        loads: list[Access] = []
        memo: dict[int, object] = {}
        space = g.space

        def load(layout, shape, dtype, leading=False):
            acc = self.access(layout, shape, space, leading)
            if acc not in loads:
                loads.append(acc)
            return Load(loads.index(acc), dtype)

        def expr(node: Node):
            if id(node) in memo:
                return memo[id(node)]
            value = self.values.get(id(node))
            if isinstance(value, Layout):
                e = load(value, node.shape, node.dtype)
            elif value is not None:
                e = value
            else:
                assert self.group_of.get(id(node)) is g or id(node) in self.duplicated, (
                    f"internal error: {node} is read by a kernel before it is computed")
                if node.op == "one_hot":
                    label = node.inputs[0]
                    lay = self.values[id(label)]
                    args = (load(lay, label.shape, label.dtype, leading=True) if isinstance(lay, Layout)
                            else lay, Index(len(space) - 1))
                elif node.op == "uniform":
                    args = (expr(node.inputs[0]), FlatIndex())
                elif node.op == "causal_mask":     # compares the row and column indices
                    args = (expr(node.inputs[0]), Index(len(space) - 2), Index(len(space) - 1))
                else:
                    args = tuple(expr(i) for i in node.inputs)
                e = Op(node.op, args, node.attrs, node.dtype)
            memo[id(node)] = e
            return e

        stores: list[Store] = []
        for node in g.members:
            if node is g.anchor and node.op == "window_add":
                stores.append(self._scatter_store(node, g, expr(node.inputs[0])))
            elif node is g.anchor and node.op in REDUCE:
                out = self.new_buffer(node)
                kept = [a for a in range(len(space)) if a not in g.reduce_axes]
                out_strides = row_major(tuple(dims_of(space)[a] for a in kept))
                strides = [ZERO] * len(space)
                for a, s in zip(kept, out_strides):
                    strides[a] = s if space[a] != 1 else ZERO
                stores.append(Store(Access(out, tuple(strides)), expr(node.inputs[0]), REDUCE[node.op],
                                    node))
                self.values[id(node)] = self.contiguous(node, out)
            elif node is g.anchor or id(node) in self.output_ids:
                out = self.new_buffer(node)
                layout = self._follow(node, g, out) if self.ordered else None
                layout = layout or self.contiguous(node, out)
                stores.append(Store(self.access(layout, node.shape, space), expr(node), None, node))
                self.values[id(node)] = layout
        window_axes = len(g.anchor.attr["kernel"]) if g.anchor.op == "window_add" else 0
        self._emit(g.anchor.op, space, g.reduce_axes, loads, stores, list(g.members), None, window_axes)

    def _scatter_store(self, node: Node, g: _Group, value) -> Store:
        """A window_add of windows that do not overlap, in the kernel over the windows: each
        element stored at its place as 0 + element (what adding it into the zeroed image gives,
        -0.0 included); the image zeroed first where the windows leave elements out. The image
        axes lie in the order of the lead axes of the group's first operand read whole through
        windows (a ReLU output in a product's [C, N, H, W] order), so the mask and the next
        product's read stream."""
        a = node.attr
        k = len(a["kernel"])
        lead = node.type.ndim - k
        order = None
        for m in g.members:
            for x in m.inputs:
                read = self.values.get(id(x))
                if (order is None and isinstance(read, Layout) and x.shape == g.space
                        and all(s[0] != 0 for s in read.strides[:lead])):
                    order = sorted(range(lead), key=lambda i: -stride_weight(read.strides[i]))
        order = None if order is None else order + list(range(lead, lead + k))
        if exact_cover(node):
            layout = self._in_order(node, self.new_buffer(node), order)
        else:
            layout = self._fill(node, Const(0.0, node.dtype), order)
        windows = Layout(layout.buffer, _window_strides(layout.strides, a))
        self.values[id(node)] = layout
        total = Op("add", (Const(0.0, node.dtype), value), (), node.dtype)
        return Store(self.access(windows, g.space, g.space), total, None, node)

    def _follow(self, node: Node, g: _Group, buffer: int) -> Layout | None:
        """The layout of an image kernel's result (3 axes or more) where the first operand of
        its group that covers its whole shape lies in another axis order: that order (a
        convolution's product is [C, N, H, W]: its bias, ReLU and their gradients then stream
        both ways, and the gradient reshaped back into [C, N*H*W] for the next product needs no
        copy). None: row-major, also where the group reads a parameter or optimizer state of
        the result's shape (an update, written in place over it: a convolution's weight gradient
        comes out of its product transposed)."""
        if node.type.ndim < 3:
            return None
        members = {id(m) for m in g.members}
        whole = [self.values.get(id(x)) for m in g.members for x in m.inputs
                 if id(x) not in members and x.shape == node.shape]
        whole = [v for v in whole if isinstance(v, Layout)]
        if any(self.buffers[v.buffer].kind in ("param", "state") for v in whole):
            return None
        for value in whole[:1]:
            order = _axis_order(value, node.shape)
            if order is not None and order != list(range(len(order))):
                return self._in_order(node, buffer, order)
        return None

    def _layout_of(self, node: Node) -> Layout:
        value = self.values[id(node)]
        if isinstance(value, Layout):
            return value
        # A scalar constant read where a buffer is needed (a matrix product): fill one.
        layout = self._fill(node, value)
        self.values[id(node)] = layout
        return layout

    def _matmul(self, node: Node) -> None:
        a, b = node.inputs
        la, lb = self._matrix(a, self._layout_of(a)), self._matrix(b, self._layout_of(b))
        out = self.new_buffer(node)
        lc = self.contiguous(node, out)
        # The iteration space is batch + [M] + [K] + [N]; K (reduced) sits before N so that the
        # fallback loop runs along contiguous rows of B and C.
        a2, b2 = a.type.ndim >= 2, b.type.ndim >= 2
        batch = node.shape[: len(node.shape) - (a2 + b2)]
        nb = len(batch)
        m = (a.shape[-2],) if a2 else ()
        n = (b.shape[-1],) if b2 else ()
        k = a.shape[-1]
        space = tuple(batch) + m + (k,) + n
        kaxis = nb + len(m)

        def strides_for(layout: Layout, shape, axes_map):
            # axes_map: for each operand axis, the space axis it runs along (batch axes broadcast).
            strides = [ZERO] * len(space)
            for axis, space_axis in enumerate(axes_map):
                if space_axis is not None and shape[axis] != 1:
                    strides[space_axis] = layout.strides[axis]
            return Access(layout.buffer, tuple(strides), layout.offset)

        def batch_map(ndim):
            lead = ndim - 2
            return [nb - lead + i for i in range(lead)]

        amap = (batch_map(a.type.ndim) + [nb, kaxis]) if a2 else [kaxis]
        bmap = (batch_map(b.type.ndim) + [kaxis, kaxis + 1]) if b2 else [kaxis]
        loads = [strides_for(la, a.shape, amap), strides_for(lb, b.shape, bmap)]
        cmap = list(range(nb)) + ([nb] if a2 else []) + ([kaxis + 1] if b2 else [])
        store_acc = strides_for(lc, node.shape, cmap)
        expr = Op("mul", (Load(0, a.dtype), Load(1, b.dtype)), (), node.dtype)
        blas = (0, 1) if (a2 and b2) else None     # batched too: the llvm backend loops GEMMs
        self._emit("matmul", space, (kaxis,), loads, [Store(store_acc, expr, "sum", node)], [node], blas)
        self.values[id(node)] = lc

    def _matrix(self, node: Node, layout: Layout) -> Layout:
        """A product's operand as a BLAS can read it. A float view that no BLAS reads as a
        matrix is copied in order first (once, however many products read it), else the
        product would run as the generated loop: both matrix axes stepping by more than one
        element (a split reshape of a transposed view), a matrix axis broadcast (stride 0: the
        gradient of a sum over a sequence, read by a linear layer), or rows that overlap (a
        window view whose row stride is shorter than its known row length)."""
        if node.type.ndim < 2 or node.dtype not in (DType.f32, DType.f64):
            return layout
        dims, strides = dims_of(node.shape)[-2:], layout.strides[-2:]
        if ONE in dims:
            return layout
        if ONE in strides and ZERO not in strides:
            step = strides[0] if strides[1] == ONE else strides[1]
            length = dims[1] if strides[1] == ONE else dims[0]
            if step[1] or length[1] or step[0] >= length[0]:
                return layout
        if id(node) not in self.matrix_copies:
            self.matrix_copies[id(node)] = self._copied(node, layout, node.shape)
        return self.matrix_copies[id(node)]

    def _copied(self, node: Node, value: Layout, shape) -> Layout:
        """A copy kernel putting the elements of `value` (viewed as `shape`, which has node's
        elements) in row-major order in a new buffer of node's: node's layout there."""
        out = self.new_buffer(node)
        self._emit("copy", shape, (), [self.access(value, shape, shape)],
                   [Store(Access(out, row_major(dims_of(shape))), Load(0, node.dtype), None, node)],
                   [node])
        return self.contiguous(node, out)

    def _concat(self, node: Node) -> None:
        out = self.new_buffer(node)
        layout = self.contiguous(node, out)
        axis = node.attr["axis"] % node.type.ndim
        start = 0
        for part in node.inputs:
            value = self.values[id(part)]
            target = Layout(out, layout.strides, offset_add((), smul((start, ()), layout.strides[axis])))
            if isinstance(value, Layout):
                loads, e = [self.access(value, part.shape, part.shape)], Load(0, part.dtype)
            else:
                loads, e = [], value
            self._emit("concat", part.shape, (), loads,
                       [Store(self.access(target, part.shape, part.shape), e, None, node)], [node])
            start += part.shape[axis]
        self.values[id(node)] = layout

    def _fill(self, node: Node, value: Const | SizeOf, order: list[int] | None = None) -> Layout:
        """A new buffer for node, every element set to the scalar `value`; its axes laid out in
        `order` (outermost first; default row-major)."""
        layout = self._in_order(node, self.new_buffer(node), order)
        self._emit("fill", node.shape, (), [],
                   [Store(self.access(layout, node.shape, node.shape), value, None, node)], [node])
        return layout

    def _in_order(self, node: Node, buffer: int, order: list[int] | None) -> Layout:
        """node's elements in `buffer` with its axes laid out in `order` (outermost first;
        None: row-major)."""
        if order is None:
            return self.contiguous(node, buffer)
        dims = dims_of(node.shape)
        inner = row_major(tuple(dims[a] for a in order))
        strides = [ZERO] * len(dims)
        for pos, axis in enumerate(order):
            strides[axis] = inner[pos]
        return Layout(buffer, tuple(strides))

    def _pad(self, node: Node) -> None:
        """A filled buffer, then x copied into its interior."""
        x = node.inputs[0]
        layout = self._fill(node, Const(node.attr["value"], node.dtype))
        offset: Offset = ()
        for lo, stride in zip(node.attr["low"], layout.strides):
            offset = offset_add(offset, smul((lo, ()), stride))
        inner = Layout(layout.buffer, layout.strides, offset)
        value = self.values[id(x)]
        loads, e = ([self.access(value, x.shape, x.shape)], Load(0, x.dtype)) if isinstance(value, Layout) \
            else ([], value)
        self._emit("pad", x.shape, (), loads, [Store(self.access(inner, x.shape, x.shape), e, None, node)],
                   [node])
        self.values[id(node)] = layout

    def _window_add(self, node: Node) -> None:
        """Windows added back where they were read (col2im): a zeroed buffer, then the windows'
        elements added in place. Where the backend runs a kernel's points in order (`ordered`),
        one kernel does it in one pass: over the lead axes (batch, channel) and the kernel
        offsets in the order the windows lie in memory, then the window positions. The windows
        are read once, in order; the kernel offsets' passes over the images of a channel run
        while they are in the cache; each element still gets its terms in the order of the
        kernel offsets. Otherwise one kernel per kernel offset adds that offset's slice of every
        window (no two points of such a kernel touch the same element)."""
        g = node.inputs[0]
        a = node.attr
        k = len(a["kernel"])
        lead = node.type.ndim - k
        value = self.values[id(g)]
        order = None
        if self.ordered and isinstance(value, Layout):
            # the images in the order of the windows' lead axes ([C, N, H, W] after a product)
            order = sorted(range(lead), key=lambda i: -stride_weight(value.strides[i]))
            order += list(range(lead, lead + k))
        layout = self._fill(node, Const(0.0, node.dtype), order)
        positions = g.shape[lead: lead + k]
        out = _window_strides(layout.strides, a)
        out_lead, out_positions, out_offsets = out[:lead], out[lead: lead + k], out[lead + k:]
        if self.ordered:
            # the lead and kernel-offset axes outermost, in the order the windows lie in
            # memory (a matrix product's [C*kh*kw, N*OH*OW] result: C, kh, kw, then N), so the
            # windows stream in once; the positions innermost, along rows
            g_outer = (value.strides[:lead] + value.strides[lead + k:] if isinstance(value, Layout)
                       else (ZERO,) * (lead + k))
            outer = sorted(range(lead + k), key=lambda i: -stride_weight(g_outer[i]))
            sizes = g.shape[:lead] + tuple(a["kernel"])
            space = tuple(sizes[i] for i in outer) + positions
            out_outer = out_lead + out_offsets
            acc = Access(layout.buffer, self._zero_unit(space, tuple(out_outer[i] for i in outer)
                                                        + out_positions))
            if isinstance(value, Layout):
                strides = tuple(g_outer[i] for i in outer) + value.strides[lead: lead + k]
                value = Access(value.buffer, self._zero_unit(space, strides), value.offset)
            self._add_into(space, acc, value, node)
            self.values[id(node)] = layout
            return
        space = g.shape[: g.type.ndim - k]
        out_strides = out_lead + out_positions
        for offsets in itertools.product(*map(range, a["kernel"])):
            target: Offset = ()
            for o, d, st in zip(offsets, a["dilation"], layout.strides[lead:]):
                target = offset_add(target, smul((o * d, ()), st))
            acc = self.access(Layout(layout.buffer, out_strides, target), space, space)
            addend = value
            if isinstance(value, Layout):
                here: Offset = value.offset
                for o, st in zip(offsets, value.strides[g.type.ndim - k:]):
                    here = offset_add(here, smul((o, ()), st))
                part = Layout(value.buffer, value.strides[: g.type.ndim - k], here)
                addend = self.access(part, space, space)
            self._add_into(space, acc, addend, node)
        self.values[id(node)] = layout

    def _add_into(self, space, acc: Access, addend, node: Node) -> None:
        """One window_add kernel over `space`: acc += addend (an Access of the gradient read, or
        an expression of it)."""
        loads = [acc]
        if isinstance(addend, Access):
            loads.append(addend)
            addend = Load(1, node.dtype)
        total = Op("add", (Load(0, node.dtype), addend), (), node.dtype)
        self._emit("window_add", space, (), loads, [Store(acc, total, None, node)], [node])

    @staticmethod
    def _zero_unit(space, strides) -> tuple:
        """Strides with those of axes of size 1 zeroed, as `access` gives them."""
        return tuple(ZERO if d == 1 else s for d, s in zip(space, strides))

    def _layout(self, node: Node):
        x = node.inputs[0]
        value = self.values[id(x)]
        if not isinstance(value, Layout):
            return value                  # a constant looks the same however it is arranged
        a = node.attr
        if node.op == "transpose":
            axes = a["axes"] if a["axes"] is not None else tuple(reversed(range(x.type.ndim)))
            axes = tuple(ax % x.type.ndim for ax in axes)
            return Layout(value.buffer, tuple(value.strides[ax] for ax in axes), value.offset)
        if node.op == "broadcast_to":
            pad = node.type.ndim - x.type.ndim
            strides = [ZERO] * pad + [ZERO if x.shape[i] == 1 else s for i, s in enumerate(value.strides)]
            return Layout(value.buffer, tuple(strides), value.offset)
        if node.op == "window":
            return Layout(value.buffer, _window_strides(value.strides, a), value.offset)
        if node.op == "slice":
            axis = a["axis"] % x.type.ndim
            return Layout(value.buffer, value.strides,
                          offset_add(value.offset, smul((a["start"], ()), value.strides[axis])))
        assert node.op == "reshape", f"internal error: no layout rule for {node}"
        if self._is_contiguous(value, x.shape):
            return Layout(value.buffer, row_major(dims_of(node.shape)), value.offset)
        split = _split_strides(value.strides, x.shape, node.shape)
        if split is not None:
            return Layout(value.buffer, split, value.offset)
        return self._copied(node, value, x.shape)     # a strided view's elements put in order

    @staticmethod
    def _is_contiguous(layout: Layout, shape) -> bool:
        dims = dims_of(shape)
        return _same_walk(layout.strides, row_major(dims), dims)

    def _output(self, name: str, node: Node):
        value = self.values.get(id(node))
        if not isinstance(value, Layout):
            value = self._layout_of(node)
        return self.access(value, node.shape, node.shape), dims_of(node.shape), node.dtype


def _window_strides(strides, attrs) -> tuple:
    """The strides of a `window` view [.., positions.., offsets..] of an image with `strides`:
    the lead axes' own, then each spatial axis's times the window stride (positions) and times
    the dilation (offsets within a window)."""
    k = len(attrs["kernel"])
    lead, steps = strides[: len(strides) - k], strides[len(strides) - k:]
    return (lead + tuple(smul((s, ()), st) for s, st in zip(attrs["stride"], steps))
            + tuple(smul((d, ()), st) for d, st in zip(attrs["dilation"], steps)))


def _split_strides(strides, shape, new_shape) -> tuple | None:
    """The strides of a reshape that only splits axes (each axis of `shape` becomes a run of axes
    of `new_shape` of the same total size; axes of size 1 anywhere), from those of a strided view:
    a split axis's parts step through it as a row-major block would. None for any other reshape
    (one that merges axes needs its elements in order: a copy), and for a broadcast view (whose
    copy a matrix product reads as a matrix)."""
    old = [(size_of(d), st) for d, st in zip(shape, strides) if size_of(d) != ONE]
    if any(st == ZERO for _, st in old):
        return None
    out = []
    for d in reversed(new_shape):
        size = size_of(d)
        if size == ONE:
            out.append(ZERO)
            continue
        if not old:
            return None
        whole, stride = old[-1]
        if size == whole:
            out.append(stride)
            old.pop()
            continue
        rest = _quotient(whole, size)
        if rest is None:
            return None
        out.append(stride)
        old[-1] = (rest, smul(stride, size))
    if old:
        return None
    return tuple(reversed(out))


def _quotient(whole, part):
    """whole / part as a Size where part divides it (coefficients and symbols), else None."""
    syms = list(whole[1])
    for s in part[1]:
        if s not in syms:
            return None
        syms.remove(s)
    if part[0] == 0 or whole[0] % part[0]:
        return None
    return (whole[0] // part[0], tuple(syms))


def _axis_order(layout: Layout, shape) -> list[int] | None:
    """The axes of `shape` from outermost to innermost where `layout` is a whole buffer in some
    axis order (a transposed row-major array, no offset, no broadcast); else None."""
    if layout.offset or any(d == 1 for d in shape):
        return None
    dims = dims_of(shape)
    order = sorted(range(len(dims)), key=lambda a: -stride_weight(layout.strides[a]))
    inner = row_major(tuple(dims[a] for a in order))
    if any(layout.strides[a] != inner[pos] for pos, a in enumerate(order)):
        return None
    return order


def plan_kernels(graph: Graph, updates: Sequence[Update] = (), ordered: bool = False) -> KernelPlan:
    """Fuse a lowered (primitive) graph into kernels over buffers; `updates` (the train step's
    contract, graphc.ir.contract) are written in place where they can be. `ordered`: the backend
    runs each kernel's points one after another in loop order (llvm), so a kernel's points may
    add into the same element (window_add in one pass); a backend that runs points at once
    (cuda) leaves it False."""
    if ordered:
        graph = rewrite_windows(graph)
    plan = _Planner(graph, ordered).build()
    plan_in_place_updates(plan, [u for u, _, _ in bind_updates(graph, updates)])
    if ordered:
        from graphc.backends.kernels.schedule import hoist_last_readers
        hoist_last_readers(plan, dict.fromkeys(plan.symbols, 64))
    return plan


def plan_in_place_updates(plan: KernelPlan, updates: Sequence[Update]) -> None:
    """The outputs that `updates` name (optimizer updates, running statistics) are written
    straight into their target's buffer when the kernel that computes them reads the target only
    at the point it writes and no later kernel reads the old value."""
    by_name = {(b.kind, b.name): b for b in plan.buffers if b.kind in ("param", "state")}
    by_output = {u.output: u for u in updates}
    for out_name, access, shape, dtype in plan.outputs:
        update = by_output.get(out_name)
        if update is None:
            continue
        target = by_name.get(("state" if update.in_state else "param", update.target))
        if target is None or target.dtype != dtype or target.shape != shape:
            continue
        found = _writer(plan, access.buffer)
        if found is None:
            continue
        index, kernel = found
        store = next(s for s in kernel.stores if s.access.buffer == access.buffer)
        dense = row_major(kernel.space)
        if (kernel.reduce_axes or kernel.space != shape or store.access.offset or access.offset
                or not _same_walk(store.access.strides, dense, kernel.space)
                or not _same_walk(access.strides, dense, kernel.space)):
            continue
        own = [a for a in kernel.loads if a.buffer == target.id]
        if any(a.offset or not _same_walk(a.strides, store.access.strides, kernel.space) for a in own):
            continue
        if any(a.buffer == target.id for k in plan.kernels[index + 1:] for a in k.loads):
            continue
        if any(s.access.buffer == target.id for k in plan.kernels for s in k.stores):
            continue
        plan.aliases[access.buffer] = target.id


def _same_walk(strides, others, space) -> bool:
    """Do two accesses over `space` address the same elements? (An axis of size 1 has whatever
    stride: `access` gives it 0, a row-major layout the next axis's extent.)"""
    return all(d == ONE or a == b for d, a, b in zip(space, strides, others))


def _writer(plan: KernelPlan, buffer: int):
    for i, k in enumerate(plan.kernels):
        if any(s.access.buffer == buffer for s in k.stores):
            return i, k
    return None

