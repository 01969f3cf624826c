"""The llvm backend's kernels on two threads (graphc/backends/llvm/threads.py): which kernels may
split their outer loop, and a split step computes bit for bit what one thread computes."""
from __future__ import annotations

import numpy as np

from graphc.api import compile_source
from graphc.backends.kernels.ir import Access, Const, Kernel, Load, Op, Store
from graphc.backends.llvm import threads

CNN = """\
model cnn {
    input x: f32[N, 1, 14, 14]
    input y: i64[N]
    h = x -> conv(16, 3) -> relu -> max_pool(2) -> flatten -> linear(10)
    logp = log_softmax(h, axis=1)
    output logp
    loss = nll(logp, y)
}
train cnn {
    optimizer = adam(lr=1e-3)
    batch     = 64
}
"""


def _kernel(space, load_strides, store_strides, reduce_axes=(), same_buffer=False, op="add"):
    space = tuple((n, ()) for n in space)
    load = Access(0 if same_buffer else 1, tuple((s, ()) for s in load_strides))
    store = Access(0, tuple((s, ()) for s in store_strides))
    expr = Op(op, (Load(0, None), Const(1.0, None)), (), None)
    return Kernel("k", space, reduce_axes, [load], [Store(store, expr, "sum" if reduce_axes else None)],
                  [])


def test_which_kernels_split():
    def same(b):
        return b
    # elementwise, row-major: each outer index writes its own row
    assert threads.splittable(_kernel((64, 100), (100, 1), (100, 1)), same)
    # outer indices whose elements interleave are not split (memory_order puts the largest
    # stride outermost first, so kernels over permuted images split along it)
    assert not threads.splittable(_kernel((64, 8), (1, 64), (1, 64)), same)
    # a reduction over the trailing axis splits; over the leading one it does not
    assert threads.splittable(_kernel((64, 100), (100, 1), (1, 0), reduce_axes=(1,)), same)
    assert not threads.splittable(_kernel((64, 100), (100, 1), (0, 1), reduce_axes=(0,)), same)
    # col2im over channels: overlapping windows of one channel stay in one chunk
    wa = _kernel((32, 3, 3, 24, 24), (1728, 576, 576 * 9, 24, 1), (676, 26, 1, 26, 1), same_buffer=True)
    assert not threads.splittable(wa, same)     # reads its output with other strides than it writes
    wa.loads[0] = wa.stores[0].access
    assert threads.splittable(wa, same)
    # ... but not over the kernel offsets: two of them add into the same elements
    overlap = _kernel((3, 32, 24), (1, 1, 1), (1, 676, 1), same_buffer=True)
    overlap.loads[0] = overlap.stores[0].access
    assert not threads.splittable(overlap, same)
    # products go to the BLAS; one_hot checks its labels (the status word)
    mm = _kernel((64, 100), (100, 1), (100, 1))
    mm.matmul = (0, 0)
    assert not threads.splittable(mm, same)
    assert not threads.splittable(_kernel((64, 100), (100, 1), (100, 1), op="one_hot"), same)


def _run(monkeypatch, single: bool):
    if single:
        monkeypatch.setenv("GRAPHC_THREADS", "1")
    else:
        monkeypatch.delenv("GRAPHC_THREADS", raising=False)
    program = compile_source(CNN, backend="llvm")
    rng = np.random.default_rng(3)
    batch = {"x": rng.standard_normal((64, 1, 14, 14)).astype(np.float32),
             "y": rng.integers(0, 10, 64)}
    losses = [program.train_step(**batch) for _ in range(3)]
    return program, losses, {k: v.copy() for k, v in program.params.items()}


def test_two_threads_compute_what_one_does(monkeypatch):
    two, losses2, params2 = _run(monkeypatch, single=False)
    one, losses1, params1 = _run(monkeypatch, single=True)
    executor = two._executors["train_step"]
    assert "call void @graphc_parallel" in executor.source()     # the conv's kernels split
    if threads.enabled():
        assert executor._blas[2] is not None                     # and the pool was handed over
    assert one._executors["train_step"]._blas[2] is None
    assert losses1 == losses2
    for name in params1:
        np.testing.assert_array_equal(params1[name], params2[name])


def test_an_idle_worker_naps_instead_of_spinning():
    """Between steps (and during a BLAS call) the worker naps, its naps growing to a
    millisecond: it kept half a core busy before, slowing whatever else ran on the machine. A
    program without BLAS calls, so that the process's CPU time while idle is the worker's."""
    import resource
    import time
    if not threads.enabled():
        import pytest
        pytest.skip("one usable core: the kernels run without a worker thread")
    program = compile_source("model m { input x: f32[N, 4096]\n output y = relu(x) * 2.0 }",
                             backend="llvm")
    x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    for _ in range(3):
        program.forward(x=x)
    executor_source = program._executors["forward"].source()
    assert "call void @graphc_parallel" in executor_source      # the pool has work, a worker runs

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    before, start = cpu(), time.perf_counter()
    time.sleep(1.0)
    busy = (cpu() - before) / (time.perf_counter() - start)
    assert busy < 0.15, f"an idle worker used {busy:.0%} of a core"
