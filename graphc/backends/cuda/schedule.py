"""Which kernels of a plan share a launch on the GPU, where a launch costs microseconds that the
small kernels of a training step do not: an elementwise kernel that reads a matrix product's
result point by point becomes that GEMM's epilogue (bias, activation, ReLU's gradient mask, even
an optimizer's update of the weight the product is the gradient of), and the optimizer updates
left over (biases) become one launch over the concatenation of their iteration spaces.

A kernel moves only past kernels it shares no buffer with that either of them writes (buffers
compared after in-place aliasing), so every launch order computes what the plan's order does.
The arena is planned on the launch order (`as_launched`): buffers that one launch touches are
alive together, so no launch writes memory it also reads through another name.
"""
from __future__ import annotations

from dataclasses import dataclass

from graphc.backends.kernels.ir import (
    FlatIndex,
    Index,
    Kernel,
    KernelPlan,
    Load,
    Op,
    walk,
)
from graphc.ir.types import DType


@dataclass(frozen=True)
class Group:
    """Kernels (indices into the plan) run by one launch: "gemm" (a GEMM, then its epilogue
    kernels in order), "points" (independent elementwise kernels, one after another in one
    index space) or "single" (one kernel of any other shape)."""
    kind: str
    kernels: tuple[int, ...]


def gemm_ok(kernel: Kernel) -> bool:
    """A plain matrix product the tiled GEMM computes: C[m, n] = sum_k A[m, k] B[k, n] in f32 or
    f64 (others, such as a product with batch axes, render as generic reductions)."""
    if kernel.matmul is None or len(kernel.space) != 3 or len(kernel.stores) != 1:
        return False
    (store,) = kernel.stores
    e = store.expr
    return (store.reduce == "sum" and isinstance(e, Op) and e.op == "mul"
            and all(isinstance(x, Load) for x in e.args) and e.dtype in (DType.f32, DType.f64)
            and all(x.dtype is e.dtype for x in e.args))


def _elementwise(kernel: Kernel) -> bool:
    """Elementwise, with no value that depends on where in the space it is computed (one_hot's
    class index, dropout's element counter), so its points can be computed in any launch."""
    if kernel.reduce_axes or kernel.matmul is not None:
        return False
    return not any(isinstance(e, (Index, FlatIndex)) for e in walk(s.expr for s in kernel.stores))


class _Uses:
    """Each kernel's read and written buffers, after aliasing."""

    def __init__(self, plan: KernelPlan):
        self.plan = plan
        real = lambda b: plan.aliases.get(b, b)     # noqa: E731
        self.reads = [{real(a.buffer) for a in k.loads} for k in plan.kernels]
        self.writes = [{real(s.access.buffer) for s in k.stores} for k in plan.kernels]

    def conflict(self, a: int, b: int) -> bool:
        """Do kernels a and b depend on each other (one writes what the other touches)?"""
        return bool(self.writes[a] & (self.reads[b] | self.writes[b]) or self.writes[b] & self.reads[a])

    def group_conflict(self, group: list[int], k: int) -> bool:
        return any(self.conflict(g, k) for g in group)


def schedule(plan: KernelPlan) -> list[Group]:
    """The plan's kernels as launches, in launch order."""
    uses = _Uses(plan)
    order: list[list[int]] = [[i] for i in range(len(plan.kernels))]
    for head in [g[0] for g in order if gemm_ok(plan.kernels[g[0]])]:
        _grow_epilogue(plan, uses, order, head)
    updates = _gather_updates(plan, uses, order)
    groups = []
    for g in order:
        kind = "gemm" if gemm_ok(plan.kernels[g[0]]) else "single"
        groups.append(Group(kind, tuple(g)))
    if updates:
        groups.append(Group("points", tuple(updates)))
    return groups


def _point_access(access, space_rank: int):
    """An access as a key that compares equal for equal points of [M, N] spaces."""
    strides = access.strides if space_rank == 2 else (access.strides[0], access.strides[2])
    return access.buffer, strides, access.offset


def _grow_epilogue(plan: KernelPlan, uses: _Uses, order: list[list[int]], head: int) -> None:
    """Moves the kernels that read the GEMM's result (or an earlier epilogue's) point by point
    into the GEMM's launch, one after another, while each can move there."""
    at = next(n for n, g in enumerate(order) if g[0] == head)
    group = order[at]
    gemm = plan.kernels[head]
    m, n = gemm.space[0], gemm.space[2]
    real = lambda b: plan.aliases.get(b, b)     # noqa: E731
    held = {_point_access(gemm.stores[0].access, 3)}     # values at the point, in registers
    held_buffers = {real(gemm.stores[0].access.buffer)}
    while True:
        nxt = next((p for p in range(at + 1, len(order))
                    if any(real(a.buffer) in held_buffers for a in plan.kernels[order[p][0]].loads)),
                   None)
        if nxt is None or len(order[nxt]) != 1:
            return
        (k,) = order[nxt]
        kernel = plan.kernels[k]
        if not (_elementwise(kernel) and kernel.space == (m, n)):
            return
        reads_held = [_point_access(a, 2) for a in kernel.loads if real(a.buffer) in held_buffers]
        if not all((b, s, o) in held for b, s, o in reads_held):
            return                      # it reads a result at another point: another block's
        touched = set().union(*(uses.reads[g] | uses.writes[g] for g in group))
        if uses.writes[k] & touched:
            return                      # it overwrites what the launch still reads
        if any(uses.group_conflict(order[p], k) for p in range(at + 1, nxt)):
            return                      # it cannot move past a kernel between
        group.append(k)
        del order[nxt]
        for s in kernel.stores:
            held.add(_point_access(s.access, 2))
            held_buffers.add(real(s.access.buffer))


def _gather_updates(plan: KernelPlan, uses: _Uses, order: list[list[int]]) -> list[int]:
    """The train step's updates (elementwise kernels writing, in place, what the step's contract
    names: parameters, optimizer state, running statistics; the plan's aliases) that can all
    move to the end of the step, when there are two or more: removed from `order`."""
    updated = set(plan.aliases.values())
    candidates = [p for p, g in enumerate(order) if len(g) == 1 and _elementwise(plan.kernels[g[0]])
                  and uses.writes[g[0]] & updated and plan.kernels[g[0]].space]
    chosen: list[int] = []          # positions in `order`
    for p in candidates:
        k = order[p][0]
        if any(uses.group_conflict(order[q], k) for q in range(p + 1, len(order))):
            continue
        if any(uses.conflict(order[q][0], k) for q in chosen):
            continue
        chosen.append(p)
    if len(chosen) < 2:
        return []
    kernels = [order[p][0] for p in chosen]
    for p in sorted(chosen, reverse=True):
        del order[p]
    return kernels


def as_launched(plan: KernelPlan, groups: list[Group]) -> KernelPlan:
    """The plan with one kernel per launch (the launch's loads and stores together), in launch
    order: what memory planning needs to see (`plan_arena(as_launched(...))`)."""
    kernels = []
    for g in groups:
        members = [plan.kernels[i] for i in g.kernels]
        head = members[0]
        kernels.append(Kernel(head.name, head.space, head.reduce_axes,
                              [a for k in members for a in k.loads],
                              [s for k in members for s in k.stores],
                              [n for k in members for n in k.nodes], head.matmul))
    return KernelPlan(plan.name, plan.buffers, kernels, plan.outputs, plan.symbols, plan.aliases)
