"""Rewrites of window gradients (max-pooling's backward) for the kernel planner, so that the whole
gradient of a pooling layer and the ReLU mask after it become one kernel (llvm: `ordered`).

max-pooling's gradient (graphc/ir/gradients.py `_max`) is `g * hit / ties` over the windows
`[N, C, OH, OW, kh, kw]`, where `ties` is the sum of `hit` over each window broadcast back, then
`window_add` puts each window's elements back into the image, and ReLU's gradient masks the image.
The planner would give the sum, its input, the quotient, the zeroed image, the scatter and the
mask a kernel each. Two rewrites here:

- A sum over the offsets of a window (its operand reads a `window` view; known sizes, at most
  SMALL_WINDOW elements) that is read only broadcast back over its input's shape is spelled out
  as elementwise adds of its input at each window offset (each read through a broadcast slice,
  a view), in index order (((v0 + v1) + v2) + v3): it fuses into its reader. For max-pooling's
  tie counts (small integers) that is exact in any order, so bit for bit numpy's; a float sum
  may round differently, within the reassociation llvm's sums already allow.
- A `where(mask, window_add(d), c)` (c a constant that is not negative) over windows that cover the image
  exactly once (stride = kernel, no dilation, nothing left over) is `window_add(where(mask',
  d, c))`, with mask' the mask's elementwise expression over windowed views of its operands:
  each element of the image gets `0 + x` either way (with c: `0 + c = c`).

The planner (`fuse.py`) then treats a `window_add` of non-overlapping windows as a pointwise
reader that stores each window element into its place.
"""
from __future__ import annotations

import itertools
import math

from graphc.ir import OPS
from graphc.ir import ops as op_table
from graphc.ir.node import Graph, Node
from graphc.ir.ops import Operand
from graphc.ir.shapes import normalize_axes

SMALL_WINDOW = 16
_POSITIONAL = ("one_hot", "causal_mask", "uniform")    # elementwise ops that read their position


def rewrite_windows(graph: Graph) -> Graph:
    """`graph` with the two rewrites above applied wherever they fit."""
    return _Rewrite(graph).run()


class _Rewrite:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.users: dict[int, list[Node]] = {}
        for n in graph.nodes():
            for i in n.inputs:
                self.users.setdefault(id(i), []).append(n)
        self.outputs = {id(n) for _, n in graph.outputs}
        self.new: dict[int, Node] = {}          # original node -> its rewritten form

    def run(self) -> Graph:
        for node in self.graph.nodes():
            inputs = [self.new[id(i)] for i in node.inputs]
            self.new[id(node)] = (self._mask_into_windows(node, inputs) or self._spelled_sums(node, inputs)
                                  or op_table.rebuilt(node, inputs))
        return Graph(self.graph.name, tuple((name, self.new[id(n)]) for name, n in self.graph.outputs),
                     self.graph.mode)

    def only_user(self, node: Node, user: Node) -> bool:
        return id(node) not in self.outputs and [id(u) for u in self.users.get(id(node), [])] == [id(user)]

    def clone(self, node: Node, leaf, memo: dict, root: bool = True) -> Node | None:
        """node's elementwise expression (the root, and the nodes below it that only it reads),
        with every other value it reads (rewritten) replaced by leaf(value); None where leaf
        refuses."""
        if id(node) in memo:
            return memo[id(node)]
        users = self.users.get(id(node), [])
        private = root or (len(users) == 1 and id(node) not in self.outputs)
        if _clonable(node) and private:
            args = [self.clone(i, leaf, memo, False) for i in node.inputs]
            out = None if any(a is None for a in args) else \
                op_table.apply(node.op, args, node.attr, loc=node.loc, tags=node.tags)
        else:
            out = leaf(self.new[id(node)])
        memo[id(node)] = out
        return out

    def _spelled_sums(self, node: Node, inputs: list[Node]) -> Node | None:
        """An elementwise node reading a sum over small window axes broadcast back to the sum's
        input shape, as adds of that input at each offset (see the module's docstring)."""
        if not _clonable(node):
            return None
        changed = False
        for j, kept in enumerate(node.inputs):
            total = kept.inputs[0] if kept.op == "reshape" else kept
            if total.op != "sum" or (kept is not total and not self.only_user(total, kept)):
                continue
            if any(not _clonable(u) or u.shape != total.inputs[0].shape
                   for u in self.users.get(id(kept), [])) or id(kept) in self.outputs:
                continue
            spelled = self._spelled(total, kept)
            if spelled is not None and node.shape == spelled.shape:
                inputs[j], changed = spelled, True
        if not changed:
            return None
        return op_table.apply(node.op, inputs, node.attr, loc=node.loc, name=node.name, tags=node.tags)

    def _spelled(self, total: Node, kept: Node) -> Node | None:
        e = total.inputs[0]
        ndim = e.type.ndim
        axes = normalize_axes("sum", Operand(e.type, ""), total.attr["axis"])
        sizes = [e.shape[a] for a in axes]
        keep_shape = tuple(1 if a in axes else d for a, d in enumerate(e.shape))
        if kept.shape != keep_shape or e.dtype != total.dtype or not e.dtype.is_float \
                or any(isinstance(s, str) for s in sizes) \
                or not 2 <= math.prod(sizes) <= SMALL_WINDOW or not _clonable(e) \
                or axes != tuple(range(ndim - len(axes), ndim)):
            return None
        # only over a window's offsets (pooling's ties): each offset's term is computed at every
        # element of the window, which is cheap there (a compare) but not for any small axis
        leaves: list[Node] = []
        self.clone(e, lambda leaf: leaves.append(leaf) or leaf, {})
        if not any(leaf.op == "window" and len(leaf.attr["kernel"]) == len(axes) for leaf in leaves):
            return None
        out = None
        for offsets in itertools.product(*map(range, sizes)):
            term = self.clone(e, lambda leaf, o=offsets: _at_offset(leaf, e.shape, axes, o), {})
            if term is None:
                return None
            out = term if out is None else op_table.apply("add", [out, term], loc=total.loc, tags=total.tags)
        return out

    def _mask_into_windows(self, node: Node, inputs: list[Node]) -> Node | None:
        """where(mask, window_add(d), c) -> window_add(where(windowed mask, d, c))."""
        if node.op != "where":
            return None
        for branch in (1, 2):
            scatter, other = node.inputs[branch], node.inputs[3 - branch]
            if scatter.op == "window_add":
                break
        else:
            return None
        new_scatter, new_other = inputs[branch], inputs[3 - branch]
        if new_scatter.op != "window_add" or not exact_cover(new_scatter) or \
                not self.only_user(scatter, node) or node.shape != scatter.shape or \
                other.op != "const" or math.copysign(1.0, float(other.attr["value"])) < 0:
            return None
        a = new_scatter.attr
        k = len(a["kernel"])
        view = {"kernel": a["kernel"], "stride": a["stride"], "dilation": a["dilation"]}

        def windowed(leaf: Node) -> Node | None:
            if leaf.op == "const":
                return leaf
            if leaf.shape != scatter.shape or leaf.type.ndim < k:
                return None
            return op_table.apply("window", [leaf], view, loc=leaf.loc, tags=leaf.tags)
        mask = self.clone(node.inputs[0], windowed, {})
        if mask is None:
            return None
        d = new_scatter.inputs[0]
        args = [mask, d, new_other] if branch == 1 else [mask, new_other, d]
        inner = op_table.apply("where", args, loc=node.loc, tags=node.tags)
        # the scatter stands for the pooling's gradient (`graphc time` names its line), the mask
        # inside it for the ReLU's
        return op_table.apply("window_add", [inner], a, loc=new_scatter.loc, name=node.name,
                              tags=new_scatter.tags)


def _clonable(node: Node) -> bool:
    return OPS[node.op].kind == "elementwise" and node.op not in _POSITIONAL and bool(node.inputs)


def _at_offset(leaf: Node, shape: tuple, axes: tuple, offsets: tuple) -> Node | None:
    """leaf's element at the window offsets along `axes` of `shape`, broadcast over them (a view)."""
    if leaf.op == "const":
        return leaf
    pad = len(shape) - leaf.type.ndim
    out = leaf
    for a, o in zip(axes, offsets):
        la = a - pad
        if la < 0 or leaf.shape[la] == 1:
            continue
        out = op_table.apply("slice", [out], {"axis": la, "start": o, "stop": o + 1},
                             loc=leaf.loc, tags=leaf.tags)
    if out is leaf:
        return leaf
    return op_table.apply("broadcast_to", [out], {"shape": leaf.shape}, loc=leaf.loc, tags=leaf.tags)


def exact_cover(node: Node) -> bool:
    """Does a window_add's every image element get exactly one window element?"""
    a = node.attr
    g = node.inputs[0]
    k = len(a["kernel"])
    out = g.shape[g.type.ndim - 2 * k: g.type.ndim - k]
    return (tuple(a["stride"]) == tuple(a["kernel"]) and all(d == 1 for d in a["dilation"])
            and all(s == o * st for s, o, st in zip(a["size"], out, a["stride"])))
