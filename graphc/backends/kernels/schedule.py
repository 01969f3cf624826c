"""Kernel order for memory: a kernel that is the last to read a large temporary moves up to just
after the kernels it depends on, so that the temporary dies sooner.

The plan's order is the graph's, which puts a convolution's input gradient (its column gradients,
42 MB for mnist_cnn's second layer at batch 64) before its weight gradient, which reads the
forward pass's columns (another 42 MB) for the last time: both sets of columns are alive at once.
Run first, the weight gradient frees the columns before the column gradients exist: the train
step's planned peak drops by their size. Only kernels whose outputs are fresh temporaries move
(no in-place update, no check: a failed check still stops the step before any update), and only
when what they free is larger than what they write.
"""
from __future__ import annotations

from graphc.backends.kernels.ir import KernelPlan, sval


def hoist_last_readers(plan: KernelPlan, dims: dict[str, int]) -> None:
    """Reorder `plan.kernels` in place (see the module's docstring); `dims` sizes the buffers
    (the symbolic sizes' values only rank them)."""
    def nbytes(buffer: int) -> int:
        b = plan.buffers[buffer]
        return sval(b.elements, dims) * b.dtype.numpy.itemsize

    outputs = {access.buffer for _, access, _, _ in plan.outputs}
    kernels = plan.kernels
    i = 0
    while i < len(kernels):
        k = kernels[i]
        reads = {a.buffer for a in k.loads}
        writes = {s.access.buffer for s in k.stores}
        # matrix products only (a weight gradient after a convolution's input gradient)
        movable = (k.matmul is not None and not writes & outputs
                   and not any(b in plan.aliases or plan.buffers[b].kind != "temp" for b in writes)
                   and not reads & writes)
        if movable:
            later = {a.buffer for j in kernels[i + 1:] for a in j.loads}
            freed = sum(nbytes(b) for b in reads if b not in later and plan.buffers[b].kind == "temp")
            written = sum(nbytes(b) for b in writes)
            # just after the last kernel that writes what k reads
            at = max((j for j in range(i) if {s.access.buffer for s in kernels[j].stores} & reads),
                     default=-1) + 1
            between = kernels[at:i]
            touched = {a.buffer for j in between for a in j.loads} | {
                s.access.buffer for j in between for s in j.stores}
            if freed > written and at < i and not touched & writes:
                kernels.insert(at, kernels.pop(i))
        i += 1
