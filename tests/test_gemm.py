"""The llvm backend's matrix products (graphc/backends/llvm/gemm.py): the generated GEMM against
float64 numpy on ragged shapes and every layout it takes, the BLAS calls dealt out to the thread
pool (rows, columns, batch elements) with results independent of the thread count, the rule that
picks between them, and OpenBLAS held to one thread while a graph runs."""
from __future__ import annotations

import numpy as np
import pytest

from graphc.backends.llvm import blas, gemm, jit, threads
from graphc.ir import ops as op_table
from graphc.ir.node import Graph
from graphc.ir.types import DType, TensorType
from graphc.passes import PipelineOptions, run_pipeline
from graphc.runtime import Program


def _product(m: int, k: int, n: int, transposed: bool = False, batch: tuple = ()):
    """C = A @ B as a graph: A [*batch, M, K] (given as [*batch, K, M] and transposed when
    `transposed`), B [*batch, K, N]."""
    a_shape = (*batch, k, m) if transposed else (*batch, m, k)
    a = op_table.source("input", TensorType(DType.f32, a_shape), name="a")
    b = op_table.source("input", TensorType(DType.f32, (*batch, k, n)), name="b")
    axes = tuple(range(len(batch))) + (len(batch) + 1, len(batch))
    left = op_table.apply("transpose", [a], {"axes": axes}) if transposed else a
    graph = run_pipeline(Graph("gemm", (("c", op_table.apply("matmul", [left, b])),)),
                         PipelineOptions(verify=True))
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    feeds = {"a": rng.standard_normal(a_shape).astype(np.float32),
             "b": rng.standard_normal((*batch, k, n)).astype(np.float32)}
    left_value = np.swapaxes(feeds["a"], -1, -2) if transposed else feeds["a"]
    want = left_value.astype(np.float64) @ feeds["b"].astype(np.float64)
    return graph, feeds, want


def _run(graph, feeds, monkeypatch, mode: str, single: bool = False):
    monkeypatch.setenv("GRAPHC_GEMM", mode)
    if single:
        monkeypatch.setenv("GRAPHC_THREADS", "1")
    else:
        monkeypatch.delenv("GRAPHC_THREADS", raising=False)
    program = Program("gemm", {"forward": graph}, {}, {}, backend="llvm")
    out = program.forward(**feeds)["c"]
    return out, program._executors["forward"].source()


# M not a multiple of MR, N not of NR, K over one packed block (KC), a single ragged panel
SHAPES = [(64, 288, 2304), (13, 9, 100), (9, 700, 50), (70, 37, 4099), (8, 800, 48), (1000, 5, 97),
          (5, 300, 17)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_generated_gemm_matches_float64(monkeypatch, m, k, n, transposed):
    graph, feeds, want = _product(m, k, n, transposed)
    got, source = _run(graph, feeds, monkeypatch, "generated")
    assert "call void @graphc_sgemm(" in source
    scale = np.sqrt(k)          # each element a sum of k products of unit normals
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_generated_gemm_on_one_core_is_bit_for_bit_the_same(monkeypatch):
    """Each element's sum runs in the same order in whichever panel, on whichever core."""
    graph, feeds, _ = _product(70, 400, 4099)
    two, _ = _run(graph, feeds, monkeypatch, "generated")
    one, _ = _run(graph, feeds, monkeypatch, "generated", single=True)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("m,k,n,transposed,batch", [
    (300, 64, 40, False, ()),          # cut into two blocks of rows
    (40, 64, 300, True, ()),           # ... of columns
    (300, 1000, 2048, False, ()),      # large: OpenBLAS would round differently on two threads
    (16, 8, 64, False, (6, 12)),       # a batch: its elements dealt out
])
def test_blas_calls_on_the_pool_are_exact_and_independent_of_the_thread_count(
        monkeypatch, m, k, n, transposed, batch):
    if not jit.blas().sgemm:
        pytest.skip("numpy links no CBLAS graphc recognizes: products run as generated loops")
    graph, feeds, want = _product(m, k, n, transposed, batch)
    two, source = _run(graph, feeds, monkeypatch, "blas")
    one, _ = _run(graph, feeds, monkeypatch, "blas", single=True)
    assert f"@{blas.task_name(True)}" in source and "@graphc_sgemm(" not in source
    np.testing.assert_allclose(two, want, rtol=0, atol=1e-5 * np.sqrt(k))
    np.testing.assert_array_equal(one, two)


def test_the_rule_picks_short_wide_products():
    # a convolution's products at batch 64 and 8
    assert gemm.picks(64, 288, 36864) and gemm.picks(288, 64, 36864) and gemm.picks(64, 288, 4608)
    # a long K (a linear layer over 9216 inputs, a weight gradient over a batch), few columns,
    # little work: OpenBLAS
    assert not gemm.picks(64, 9216, 128)
    assert not gemm.picks(784, 4096, 512)
    assert not gemm.picks(768, 128, 384)
    assert not gemm.picks(32, 9, 676)


def test_auto_calls_the_generated_gemm_where_the_rule_says_on_avx512(monkeypatch):
    monkeypatch.setattr(gemm, "host_has_avx512", lambda: True)
    graph, feeds, want = _product(64, 288, 2304)
    got, source = _run(graph, feeds, monkeypatch, "auto")
    assert "call void @graphc_sgemm(" in source and f"icmp ule i64 288, {gemm.SHORT_K}" in source
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    monkeypatch.setattr(gemm, "host_has_avx512", lambda: False)
    _, source = _run(graph, feeds, monkeypatch, "auto")
    assert "@graphc_sgemm(" not in source
    _, source = _run(graph, feeds, monkeypatch, "blas")
    assert "@graphc_sgemm(" not in source


def test_the_gemm_mode_is_part_of_the_cached_codes_identity(monkeypatch):
    graph, _, _ = _product(64, 288, 2304)
    from graphc.backends.llvm.executor import LLVMExecutor
    identities = set()
    for mode in ("auto", "blas", "generated"):
        monkeypatch.setenv("GRAPHC_GEMM", mode)
        identities.add(LLVMExecutor(graph)._code.identity())
    assert len(identities) == 3


def test_openblas_runs_single_threaded_only_while_graphs_run():
    """Counted: the first graph in saves the count, the last one out restores it."""
    count = [4]
    calls = []

    def set_threads(n):
        calls.append(n)
        count[0] = n
    one = threads.OneBlasThread((set_threads, lambda: count[0]))
    with one:
        assert count[0] == 1
        with one:                  # a second graph, in another Python thread
            assert count[0] == 1
        assert count[0] == 1       # the first still runs
    assert count[0] == 4 and calls == [1, 4]


def test_a_graph_leaves_openblas_thread_count_as_it_found_it(monkeypatch):
    blas = jit.blas()
    if blas.threads is None or not threads.enabled():
        pytest.skip("no OpenBLAS thread calls found, or one usable core (no pool)")
    set_threads, get_threads = blas.threads
    before = get_threads()
    seen = []

    def run(shape):
        """Run a product, recording OpenBLAS's count while its graph runs."""
        graph, feeds, _ = _product(*shape)
        program = Program("gemm", {"forward": graph}, {}, {}, backend="llvm")
        executor = program._executors["forward"]
        executor.compile()
        assert executor._blas_threads is not None
        original = executor._fn

        def spy(*args):
            seen.append(get_threads())
            return original(*args)
        executor._fn = spy
        program.forward(**feeds)
    monkeypatch.setenv("GRAPHC_GEMM", "blas")
    run((300, 64, 100))         # work enough for the pool (PARALLEL_BLAS)
    run((30, 64, 40))
    # a graph whose products are all small leaves OpenBLAS alone (two calls saved per step)
    assert seen == [1, before] and get_threads() == before


@pytest.mark.parametrize("bits", [32, 64])
def test_the_module_verifies_with_either_blas_integer_width(monkeypatch, bits):
    """The BLAS task narrows its sizes to a 32-bit BLAS's ints: the IR must verify either way
    (this machine's numpy links a 64-bit one, so only the 64-bit module runs here)."""
    from graphc.backends.kernels import plan_kernels
    from graphc.backends.llvm.codegen import build_module
    monkeypatch.setenv("GRAPHC_GEMM", "generated")
    plans = {"single": plan_kernels(_product(64, 288, 2304)[0], ordered=True),
             "batch": plan_kernels(_product(16, 8, 64, False, (6, 12))[0], ordered=True)}
    text = build_module(plans, bits).text()
    assert f"{'i32' if bits == 32 else 'i64'} %mm.i" in text and "@graphc_sgemm_task" in text
    jit.optimized_module(text)          # parses and verifies, or raises


def test_a_batch_whose_axes_do_not_flatten_is_dealt_out_too(monkeypatch):
    """Attention's heads: q [N, T, H, D] seen as [N, H, T, D] (a transposed view: the batch axes
    N and H do not flatten to one stride) times k's transpose. Each element one call, on both
    cores; the same bits on one."""
    if not jit.blas().sgemm:
        pytest.skip("numpy links no CBLAS graphc recognizes: products run as generated loops")
    n, t, h, d = 6, 64, 4, 32
    q = op_table.source("input", TensorType(DType.f32, (n, t, h, d)), name="q")
    k = op_table.source("input", TensorType(DType.f32, (n, t, h, d)), name="k")
    heads = op_table.apply("transpose", [q], {"axes": (0, 2, 1, 3)})
    keys = op_table.apply("transpose", [k], {"axes": (0, 2, 3, 1)})
    graph = run_pipeline(Graph("attention", (("c", op_table.apply("matmul", [heads, keys])),)),
                         PipelineOptions(verify=True))
    rng = np.random.default_rng(5)
    feeds = {name: rng.standard_normal((n, t, h, d)).astype(np.float32) for name in ("q", "k")}
    want = (feeds["q"].astype(np.float64).transpose(0, 2, 1, 3)
            @ feeds["k"].astype(np.float64).transpose(0, 2, 3, 1))
    two, source = _run(graph, feeds, monkeypatch, "auto")
    one, _ = _run(graph, feeds, monkeypatch, "auto", single=True)
    assert f"@{blas.task_name(True)}" in source
    np.testing.assert_allclose(two, want, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(one, two)


def test_without_memory_for_its_blocks_the_generated_gemm_still_computes(monkeypatch):
    """malloc failing (the packed blocks live on the heap): plain dot products instead."""
    import ctypes

    from graphc.backends.llvm.jit import _llvm
    llvm = _llvm()
    libc = ctypes.CDLL(None)
    real = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    asked = []
    refuse = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int64)(lambda size: asked.append(size))
    graph, feeds, want = _product(37, 300, 1000)
    llvm.add_symbol("malloc", ctypes.cast(refuse, ctypes.c_void_p).value)
    try:
        got, source = _run(graph, feeds, monkeypatch, "generated")
    finally:
        llvm.add_symbol("malloc", real)
    assert "call void @graphc_sgemm(" in source and asked and set(asked) == {gemm.SCRATCH_BYTES + 64}
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_the_shapes_bench_compares_both_paths_and_writes_its_rows(tmp_path, monkeypatch):
    """bench/gemm_shapes.py (the measurements behind `picks`) on the GPT's small products."""
    import json
    import sys
    from pathlib import Path
    monkeypatch.setenv("GRAPHC_GEMM", "auto")          # restored after; the script sets its own
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    sys.modules.pop("gemm_shapes", None)
    import gemm_shapes
    out = tmp_path / "shapes.json"
    assert gemm_shapes.main(["--rounds", "1", "--shapes", "gpt", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(gemm_shapes.SHAPES["gpt"])
    assert all(r["blas_ms"] > 0 and r["generated_ms"] > 0 for r in rows)
    assert {r["picked"] for r in rows} == {"BLAS"}       # N < 2048: the rule leaves them to BLAS


def test_a_batch_of_one_element_is_cut_in_halves_like_a_single_product(monkeypatch):
    """[1, M, K] @ [1, K, N] (one head at batch 1): two calls, as for [M, K] @
    [K, N], not one call on one core; a batch of three: one call per element."""
    import ctypes
    if not jit.blas().sgemm or jit.blas().int_bits != 64:
        pytest.skip("needs numpy's 64-bit-integer CBLAS (the spy below has its signature)")
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    signature = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, i64, i64, i64,
                                 f32, ptr, i64, ptr, i64, f32, ptr, i64)
    real = signature(jit.blas().sgemm)
    calls = []

    @signature
    def spy(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        calls.append((m, n, k))
        real(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    monkeypatch.setenv("GRAPHC_GEMM", "blas")
    # (m, n, k) of each call: N is the longer side, so the columns are cut
    for batch, want_calls in (((1,), [(400, 400, 800)] * 2), ((3,), [(400, 800, 800)] * 3)):
        graph, feeds, want = _product(400, 800, 800, False, batch)
        program = Program("gemm", {"forward": graph}, {}, {}, backend="llvm")
        executor = program._executors["forward"]
        executor.compile()
        executor._blas[0] = ctypes.cast(spy, ctypes.c_void_p).value
        calls.clear()
        got = program.forward(**feeds)["c"]
        assert sorted(calls) == want_calls
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
