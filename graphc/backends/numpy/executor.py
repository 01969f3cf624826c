"""The numpy backend: fast on the CPU without a compiler, tested against the reference evaluator
(graphc/ir/reference.py) like every other backend.

It runs a primitive graph node by node with each op's numpy reference from the op table. A plan is
made once per batch shape: what only depends on shapes and constants is computed then; every
other node becomes a precomputed call, and its result goes into a buffer of a pool reused once
the value it held is dead (in place over a dying operand of an elementwise op), so a step touches
few, warm buffers. The calls, with the parameter updates', are one generated Python function per
plan, a line each. Graph outputs get fresh arrays, never pool buffers: callers keep them.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from graphc.backends.numpy.calls import UNSUPPORTED, fast_call, frozen, scalar_nodes
from graphc.backends.numpy.updates import UpdateGroup, find_update_groups
from graphc.errors import Diagnostic, GraphcError
from graphc.ir import OPS
from graphc.ir.contract import Update, bind_updates
from graphc.ir.node import Graph, Node
from graphc.ir.reference import evaluate_node
from graphc.ir.types import bind_shape

# How a step is called: by arity (1, 2, 3; other: `out` holds the operand slots), or, for the
# common unary and binary ops without attributes, with `out=` a pool buffer or a new array.
_UNARY_INTO, _BINARY_INTO, _UNARY_NEW, _BINARY_NEW, _VARIADIC = 11, 12, 21, 22, 0

# Ops whose value depends only on their operand's shape, so a plan computes them once.
_SHAPE_ONLY = frozenset({"size"})
_LOADS = ("input", "param", "state")
_LOADS_FROM = ("feeds", "params", "state")      # where a run finds each kind of load


class NumpyExecutor:
    name = "numpy"

    def __init__(self, graph: Graph, updates: Sequence[Update] = (), timed: bool = False):
        """`updates`: the train step's contract (graphc.ir.contract), which the executor groups
        and runs in place; a graph without updates runs node by node. `timed`: every step's
        time is recorded (`graphc time`; `_Plan.step_seconds`)."""
        self.timed = timed
        for node in graph.nodes():
            op = OPS[node.op]
            assert op.kind == "source" or not op.is_composite, (
                f"internal error: the numpy backend runs primitive graphs; {node.op} is composite")
            assert op.kind == "source" or (op.numpy is not None and node.op not in UNSUPPORTED), (
                f"internal error: the numpy backend has no lowering for {node.op} "
                f"{node.dtype.value} ({node.label()})")
        self.graph = graph
        self.order = graph.nodes()
        index = {id(n): i for i, n in enumerate(self.order)}
        self.inputs = [tuple(index[id(i)] for i in n.inputs) for n in self.order]
        self.outputs = [(name, index[id(n)]) for name, n in graph.outputs]
        loads = {n.attr["name"]: i for i, n in enumerate(self.order) if n.op in ("param", "state")}
        self.updates = find_update_groups(self.order, self.inputs, self.outputs, loads,
                                          bind_updates(graph, updates))
        self.plans: dict[tuple, _Plan] = {}
        self._last: tuple = (None, None)    # the dims of the last run and their plan
        self._lock = threading.Lock()     # a plan's buffers serve one run at a time

    def plan(self, dims: dict[str, int]) -> _Plan:
        key = tuple(sorted(dims.items()))
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = _Plan(self, dims)
        self._last = (dict(dims), plan)
        return plan

    def run(self, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray],
            dims: dict[str, int], state: dict[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        with self._lock:
            last_dims, plan = self._last
            if dims != last_dims:           # training runs one batch shape after another
                plan = self.plan(dims)
            return plan.run(feeds, params, state or {})


class _Plan:
    """One batch shape: constants, the calls of the other nodes, and their buffers."""

    def __init__(self, ex: NumpyExecutor, dims: dict[str, int]):
        order, inputs = ex.order, ex.inputs
        self.nodes = order
        shapes = [bind_shape(n.shape, dims) for n in order]
        attrs = [_bound_attrs(n, dims) for n in order]
        outputs = {i for _, i in ex.outputs}
        template: list = [None] * len(order)          # constants in place, the rest per run
        loads: list[tuple[int, int, str]] = []        # (slot, 0 feeds | 1 params | 2 state, name)
        constant = [False] * len(order)
        dynamic: list[int] = []
        for i, node in enumerate(order):
            op = OPS[node.op]
            if node.op in _LOADS:
                loads.append((i, _LOADS.index(node.op), node.attr["name"]))
            elif node.op == "const":
                constant[i] = True
                template[i] = frozen(np.asarray(node.attr["value"], node.dtype.numpy))
            elif node.op in _SHAPE_ONLY or (op.kind not in ("random", "collective")
                                            and all(constant[j] for j in inputs[i])):
                constant[i] = True
                args = [template[j] if constant[j] else _shaped_like(order[j], shapes[j])
                        for j in inputs[i]]
                try:
                    template[i] = frozen(evaluate_node(node, args, dims))
                except ValueError as err:
                    raise _runtime_error(node, err) from None
            else:
                dynamic.append(i)
        # Parameter updates run as groups after every other step (updates.py): their
        # nodes are not steps; what they read is computed first.
        grouped = {i for g in ex.updates for i in g.cone}
        dynamic_set = set(dynamic) - grouped
        roots = [i for _, i in ex.outputs if i not in grouped]
        groups: list[tuple[UpdateGroup, list]] = []
        into: dict[int, np.ndarray] = {}       # gradient steps that write straight into a lane
        for g in ex.updates:
            roots += g.reads
            copied = []
            for view, slot in g.computed:
                if slot in dynamic_set and OPS[order[slot].op].numpy_out and slot not in outputs:
                    into[slot] = view
                else:
                    copied.append((view, slot))
            groups.append((g, copied))
        dynamic = _schedule(inputs, dynamic_set, roots)
        scalars = scalar_nodes(order, inputs, shapes, dynamic, [i for i, _, _ in loads])
        # What the updates read stays live to the end, like the outputs.
        steps = _plan_steps(order, inputs, shapes, attrs, dynamic, outputs, into,
                            live=set(roots), template=template, scalars=scalars)
        # Outputs are handed out: fresh arrays pass as they are, anything else is copied. An
        # update's result is the parameter's (or state's) storage itself, updated in place.
        fresh = {i for i in dynamic if i in outputs and _makes_new_array(order[i])}
        taken = []
        for name, i in ex.outputs:
            if i not in grouped:
                taken.append((name, i, i in fresh))
                fresh.discard(i)        # a second output of the same node gets its own copy
        new_views = {slot: view for g, _ in groups for view, slot in g.new_views}
        # timed: the clock after each step, and after the updates (the last entry)
        self.times = np.zeros(len(steps) + 2) if ex.timed else None
        self.step_nodes = [[order[i]] for _, i, *_ in steps] + [[order[i] for i in sorted(grouped)]]
        self.run_step = _compile_run(steps, loads, scalars, template, groups, taken,
                                     [(name, new_views[i]) for name, i in ex.outputs if i in grouped],
                                     [name for name, _ in ex.outputs], self.times)

    def run(self, feeds, params, state) -> dict[str, np.ndarray]:
        try:
            return self.run_step(feeds, params, state)
        except ValueError as err:
            i = _failed_step(err, self.run_step)
            if i is None:
                raise
            raise _runtime_error(self.nodes[i], err) from None


def _bound_attrs(node: Node, dims: dict[str, int]) -> dict:
    specs = OPS[node.op].attrs
    return {k: bind_shape(v, dims) if specs[k].kind == "ints" else v for k, v in node.attrs}


def _shaped_like(node: Node, shape: tuple[int, ...]) -> np.ndarray:
    """A stand-in of the right shape and dtype, no memory, for ops that read only the shape."""
    return np.broadcast_to(np.zeros((), node.dtype.numpy), shape)


def _makes_new_array(node: Node) -> bool:
    """Does the node's step return an array of its own? Layout ops without `out` may return a
    view of their operand (reshape, transpose, slice)."""
    op = OPS[node.op]
    return op.numpy_out or op.kind != "layout"


def _schedule(inputs: list[tuple[int, ...]], dynamic: set[int], roots: list[int]) -> list[int]:
    """The order of the computed nodes: depth first from the outputs, the deeper operand first, so
    that a cheap operand (0.9 * m in Adam) is computed just before its use, not held across the
    backward pass. Values read only by shape-only ops (size) are never computed."""
    depth: dict[int, int] = {}
    for i in sorted(dynamic):
        depth[i] = 1 + max((depth[j] for j in inputs[i] if j in dynamic), default=0)
    order: list[int] = []
    done: set[int] = set()
    for root in roots:
        stack = [(root, False)]
        while stack:
            i, expanded = stack.pop()
            if i in done or i not in dynamic:
                continue
            if expanded:
                done.add(i)
                order.append(i)
                continue
            stack.append((i, True))
            # Pushed shallow first, so the deepest operand is popped, and computed, first.
            for j in sorted(set(inputs[i]), key=lambda j: depth.get(j, 0)):
                if j not in done:
                    stack.append((j, False))
    return order


class _Pool:
    """Buffers by (shape, dtype). A buffer is free again once no live value is stored in it or
    views it; `last_use[i]` is the position of the last step that reads value i."""

    def __init__(self, last_use: dict[int, int]):
        self.last_use = last_use
        self.free: dict[tuple, list[np.ndarray]] = {}
        self.storage: dict[int, list[np.ndarray]] = {}   # value -> the buffers it lives in
        self.holders: dict[int, int] = {}               # id(buffer) -> live values in it

    def take(self, i: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
        free = self.free.get((shape, dtype))
        buf = free.pop() if free else np.empty(shape, dtype)
        self.holders[id(buf)] = 1
        self.storage[i] = [buf]
        return buf

    def view(self, i: int, operands: tuple[int, ...]) -> None:
        """Value i may be a view of its operands: it keeps their buffers alive."""
        self.storage[i] = [b for j in operands for b in self.storage.get(j, ())]
        for b in self.storage[i]:
            self.holders[id(b)] += 1

    def release(self, p: int, operands: tuple[int, ...]) -> None:
        """Step p has read its operands: those it read last give their buffers back."""
        for j in dict.fromkeys(operands):
            if self.last_use.get(j) == p:
                for b in self.storage.pop(j, ()):
                    self.holders[id(b)] -= 1
                    if self.holders[id(b)] == 0:
                        self.free.setdefault((b.shape, b.dtype), []).append(b)


def _plan_steps(order: list[Node], inputs: list[tuple[int, ...]], shapes: list[tuple],
                attrs: list[dict], dynamic: list[int], outputs: set[int],
                into: dict[int, np.ndarray], live: set[int], template: list,
                scalars: set[int]) -> list[tuple]:
    """The call of each computed node, as (fn, slot, form, a, b, c, out), and where it writes:
    a pool buffer, or for an output a new array each run (callers keep outputs). An elementwise
    op may take the buffer of an operand that dies at it: numpy's ufuncs give the same result
    when the output is an input, and the op table asks the same of every `numpy_out` op. Nodes in
    `into` write into the buffer given there (a gradient into its update group's lane); values
    in `live` are read after the last step, so their buffers are never reused. Constants a call
    needs of its own (relu's 0) are appended to `template` (calls.fast_call); `scalars`
    compute numpy scalars (calls.scalar_nodes)."""
    last_use = {i: len(dynamic) if i in outputs or i in live else -1 for i in dynamic}
    for p, i in enumerate(dynamic):
        for j in inputs[i]:
            if j in last_use:
                last_use[j] = max(last_use[j], p)
    pool = _Pool(last_use)
    steps = []
    for p, i in enumerate(dynamic):
        node, op, ins, kwargs = order[i], OPS[order[i].op], inputs[i], attrs[i]
        in_place = op.kind == "elementwise"
        if in_place:
            pool.release(p, ins)
        fn, ins, kwargs, writes = fast_call(node, ins, kwargs, shapes, shapes[i], template,
                                            i in outputs, i in scalars)
        direct = not kwargs and len(ins) in (1, 2)    # a ufunc-like call: fn(a, b, out=...)
        form, out = (len(ins) if len(ins) <= 3 else _VARIADIC), ins
        if writes and i in outputs:
            new = (shapes[i], node.dtype.numpy)
            if direct:
                form, out = _UNARY_NEW + len(ins) - 1, new
            else:
                fn = partial(_into_new, fn, *new, kwargs)
        elif writes:
            if i in into:
                buf = into[i]
                pool.storage[i] = []
            else:
                buf = pool.take(i, shapes[i], node.dtype.numpy)
            if direct:
                form, out = _UNARY_INTO + len(ins) - 1, buf
            else:
                fn = partial(fn, out=buf, **kwargs)
        else:
            if kwargs:
                fn = partial(fn, **kwargs)
            if not _makes_new_array(node):
                pool.view(i, ins)
        if not in_place:
            pool.release(p, ins)
        a, b, c = (ins + (0, 0, 0))[:3]
        steps.append((fn, i, form, a, b, c, out))
    return steps


def _compile_run(steps: list[tuple], loads: list[tuple[int, int, str]], scalars: set[int],
                 template: list, groups: list[tuple[UpdateGroup, list]],
                 taken: list[tuple[str, int, bool]], updated: list[tuple[str, np.ndarray]],
                 names: list[str], times: np.ndarray | None = None) -> Callable:
    """A run of the plan as one generated Python function of the feeds, params and state: the
    loads, a line per step, the outputs taken, the update groups' lines, the result. Values are
    local variables `v<slot>`; functions, buffers and constants are bound once. Interpreting a
    list of steps would cost as much as the small ops themselves. Loads in `scalars` are read as
    numpy scalars; `taken`: (name, slot, fresh) of the outputs that are not updates, taken
    before the updates write over the parameters they may view; `updated`: (name, the storage
    the update writes in place); `names`: the result's keys in order. When every updated param
    and state passed in was that storage already (a run given the last run's results), updates
    are not returned, as the compiled backends do: the arrays passed in hold them. A ValueError
    leaves with its step's line (_failed_step). With `times`, the clock is read into it before
    the first step (times[0]), after each step p (times[p + 1], on the step's line) and after
    the updates (times[-1])."""
    scope: dict = {"empty": np.empty, "asarray": np.asarray, "array": np.array,
                   "copyto": np.copyto}
    scope |= {f"v{j}": constant for j, constant in enumerate(template) if constant is not None}
    lines = []
    for i, kind, name in loads:
        lines.append(f"v{i} = {_LOADS_FROM[kind]}[{name!r}]" + ("[()]" if i in scalars else ""))
    timed = times is not None
    if timed:
        scope["T"], scope["clock"] = times, time.perf_counter
        lines.append("T[0] = clock()")
    first = len(lines) + 2                      # the line of the first step, after the def
    for p, (fn, i, form, a, b, c, out) in enumerate(steps):
        scope[f"f{p}"], scope[f"o{p}"] = fn, out
        if form == _VARIADIC:
            args = ", ".join(f"v{j}" for j in out)
        else:
            args = ", ".join(f"v{j}" for j in (a, b, c)[:_arity(form)])
        if form in (_UNARY_INTO, _BINARY_INTO):
            args += f", out=o{p}"
        elif form in (_UNARY_NEW, _BINARY_NEW):
            args += f", out=empty(*o{p})"
        lines.append(f"v{i} = f{p}({args})" + (f"; T[{p + 1}] = clock()" if timed else ""))
    for k, (_, i, fresh) in enumerate(taken):
        lines.append(f"r{k} = asarray(v{i})" if fresh else f"r{k} = array(v{i}, copy=True)")
    lines.append("adopted = True")
    for k, (group, copied) in enumerate(groups):
        lines += group.source(f"g{k}_", copied, scope)
    if timed:
        lines.append(f"T[{len(steps) + 1}] = clock()")
    results = {name: f"r{k}" for k, (name, _, _) in enumerate(taken)}
    returned = [name for name in names if name in results]
    lines.append("if adopted: return {" + ", ".join(f"{n!r}: {results[n]}" for n in returned) + "}")
    for k, (name, view) in enumerate(updated):
        scope[f"n{k}"] = view
        results[name] = f"n{k}"
    lines.append("return {" + ", ".join(f"{n!r}: {results[n]}" for n in names) + "}")
    source = "def run_step(feeds, params, state):\n" + "".join(f"    {line}\n" for line in lines)
    exec(compile(source, "<graphc numpy plan>", "exec"), scope)
    run = scope["run_step"]
    run.step_slots = [i for _, i, *_ in steps]      # by line, from `first_line`
    run.first_line = first
    return run


def _arity(form: int) -> int:
    return {_UNARY_INTO: 1, _BINARY_INTO: 2, _UNARY_NEW: 1, _BINARY_NEW: 2}.get(form, form)


def _failed_step(err: BaseException, run: Callable) -> int | None:
    """The slot of the step of generated `run` that raised `err`, by its line (None: not a step)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code is not run.__code__:
        tb = tb.tb_next
    line = -1 if tb is None else tb.tb_lineno - run.first_line
    return run.step_slots[line] if 0 <= line < len(run.step_slots) else None


def _into_new(fn: Callable, shape: tuple, dtype: np.dtype, kwargs: dict, *args) -> np.ndarray:
    return fn(*args, out=np.empty(shape, dtype), **kwargs)


def _runtime_error(node: Node, err: Exception) -> GraphcError:
    what = f" (computing {node.name})" if node.name else ""
    return GraphcError(Diagnostic(f"{node.op}{what}: {err}", node.loc))


BACKENDS = {"numpy": NumpyExecutor}
