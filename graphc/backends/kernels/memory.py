"""Memory planning: temporaries share one arena per batch shape, each placed where no buffer that
is alive at the same time sits; a buffer is alive from the kernel that writes it to the last
kernel that reads it (graph outputs to the end). Also the plan's statistics for `--stats`."""
from __future__ import annotations

from dataclasses import dataclass

from graphc.backends.kernels.ir import Kernel, KernelPlan, Op, expr_ops, sprod, sval

ALIGN = 64


@dataclass(frozen=True)
class Arena:
    offsets: dict[int, int]      # temp buffer -> byte offset
    size: int                    # bytes


def lifetimes(plan: KernelPlan) -> dict[int, tuple[int, int]]:
    live: dict[int, list[int]] = {}
    for i, k in enumerate(plan.kernels):
        for s in k.stores:
            live.setdefault(s.access.buffer, [i, i])
        for a in k.loads:
            if a.buffer in live:
                live[a.buffer][1] = i
    end = len(plan.kernels)
    for _, access, _, _ in plan.outputs:
        if access.buffer in live:
            live[access.buffer][1] = end
    return {b: (lo, hi) for b, (lo, hi) in live.items()}


def plan_arena(plan: KernelPlan, dims: dict[str, int]) -> Arena:
    """Greedy placement, largest first, at the lowest offset that fits between live neighbours."""
    live = lifetimes(plan)
    temps = [b for b in plan.buffers if b.kind == "temp" and b.id not in plan.aliases and b.id in live]

    def nbytes(b):
        n = sval(b.elements, dims) * b.dtype.numpy.itemsize
        return max(ALIGN, -(-n // ALIGN) * ALIGN)
    temps.sort(key=lambda b: (-nbytes(b), b.id))
    placed: list[tuple[int, int, int, int]] = []     # offset, size, first, last
    offsets: dict[int, int] = {}
    for b in temps:
        size, (first, last) = nbytes(b), live[b.id]
        clashes = sorted((o, o + s) for o, s, lo, hi in placed if lo <= last and first <= hi)
        at = 0
        for lo, hi in clashes:
            if at + size <= lo:
                break
            at = max(at, hi)
        offsets[b.id] = at
        placed.append((at, size, first, last))
    return Arena(offsets, max((o + s for o, s, _, _ in placed), default=0))


def kernel_flops(k: Kernel, dims: dict[str, int]) -> int:
    """A kernel's floating-point operations: an op per point of its space for each op of its
    expressions and each reduction (a matrix product: 2*M*K*N)."""
    points = sval(sprod(k.space), dims)
    ops = sum(1 for s in k.stores for o in expr_ops(s.expr) if isinstance(o, Op)
              and o.op not in ("cast", "stop_gradient"))
    return points * (ops + sum(1 for s in k.stores if s.reduce))


def plan_stats(plan: KernelPlan, dims: dict[str, int]) -> dict:
    """Kernels, floating-point operations, bytes moved and peak memory at the given sizes."""
    flops = moved = 0
    for k in plan.kernels:
        flops += kernel_flops(k, dims)
        for access, dtype in [(a, plan.buffers[a.buffer].dtype) for a in k.loads] + \
                             [(s.access, plan.buffers[s.access.buffer].dtype) for s in k.stores]:
            touched = sprod(sz for sz, st in zip(k.space, access.strides) if st[0] != 0)
            moved += sval(touched, dims) * dtype.numpy.itemsize
    arena = plan_arena(plan, dims)
    external = sum(sval(b.elements, dims) * b.dtype.numpy.itemsize
                   for b in plan.buffers if b.kind != "temp")
    temps = sum(sval(b.elements, dims) * b.dtype.numpy.itemsize
                for b in plan.buffers if b.kind == "temp" and b.id not in plan.aliases)
    return {"kernels": len(plan.kernels), "flops": flops, "bytes_moved": moved,
            "arena_bytes": arena.size, "temp_bytes_unplanned": temps, "external_bytes": external,
            "peak_bytes": arena.size + external}
