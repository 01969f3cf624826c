"""The kernel plan (fusion, layouts, in-place updates, memory) and the llvm backend's machinery:
code cache, CLI outputs. Numerical agreement with numpy is tests/test_llvm_backend.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphc
from graphc.backends.kernels import plan_kernels
from graphc.backends.kernels.ir import coalesce, sval
from graphc.backends.kernels.memory import lifetimes, plan_arena, plan_stats
from graphc.cli import main

MODELS = sorted(Path("models").glob("*.nn"))


def _plans(path):
    """Each graph of the model's program with its kernel plan (the train step's updates in place,
    as its contract says)."""
    program = graphc.compile_file(path)
    return {key: (graph, plan_kernels(graph, program.updates(key)))
            for key, graph in program.graphs.items()}


def test_optimizer_update_of_each_parameter_is_one_in_place_kernel():
    graph, plan = _plans("models/mnist_mlp.nn")["train_step"]
    for param in ("W1", "b1", "W2", "b2"):
        writers = [k for k in plan.kernels
                   if any(s.node is not None and s.node is dict(graph.outputs).get(f"new {param}")
                          for s in k.stores)]
        assert len(writers) == 1, param
        stored = {name for name, access, _, _ in plan.outputs
                  if any(s.access.buffer == access.buffer for s in writers[0].stores)}
        assert stored == {f"new {param}", f"new {param}#exp_avg", f"new {param}#exp_avg_sq"}
    # every updated tensor is written straight into its own buffer
    by_name = {b.name: b.id for b in plan.buffers if b.kind in ("param", "state")}
    for name, access, _, _ in plan.outputs:
        if name.startswith("new "):
            assert plan.aliases[access.buffer] == by_name[name[4:]], name
    # far fewer kernels than primitive nodes
    assert len(plan.kernels) * 3 < len(graph.nodes())


def test_layout_ops_become_strides_not_kernels():
    graph, plan = _plans("models/mnist_mlp.nn")["train_step"]
    ops = {n.op for k in plan.kernels for n in k.nodes}
    assert not ops & {"transpose", "broadcast_to", "reshape"}
    # the weight gradient x^T @ delta reads x through transposed strides
    matmuls = [k for k in plan.kernels if k.matmul]
    assert any(k.loads[0].strides[0] == (1, ()) for k in matmuls)


def test_coalesce_merges_contiguous_axes():
    program = graphc.compile_source("""
        model m { input x: f32[N, 8, 4]  param b: f32[4] = zeros()
                  output y = exp(x) * x  output z = x + b }""")
    plan = plan_kernels(program.graphs["forward"])
    whole, bias = plan.kernels
    assert len(coalesce(whole).space) == 1 and sval(coalesce(whole).space[0], {"N": 3}) == 3 * 8 * 4
    # the bias is read with stride 0 along N and 8: those two axes merge, the last cannot
    assert len(coalesce(bias).space) == 2


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_arena_never_overlaps_live_buffers(path):
    for graph, plan in _plans(path).values():
        dims = dict.fromkeys(plan.symbols, 7)
        arena = plan_arena(plan, dims)
        live = lifetimes(plan)
        placed = [(b, arena.offsets[b.id], sval(b.elements, dims) * b.dtype.numpy.itemsize)
                  for b in plan.buffers if b.id in arena.offsets]
        for i, (a, oa, sa) in enumerate(placed):
            assert oa + sa <= arena.size
            for b, ob, sb in placed[i + 1:]:
                (fa, la), (fb, lb) = live[a.id], live[b.id]
                if fa <= lb and fb <= la:
                    assert oa + sa <= ob or ob + sb <= oa, (graph.name, a, b)
        stats = plan_stats(plan, dims)
        assert stats["peak_bytes"] >= stats["arena_bytes"] and stats["kernels"] == len(plan.kernels)


def test_object_code_is_cached_on_disk(tmp_path, monkeypatch):
    from graphc.backends.llvm import jit
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    program = graphc.compile_file("models/backprop_example.nn", backend="llvm")
    program.compile()
    cached = list((tmp_path / "llvm").glob("*.objs"))
    assert len(cached) == 1          # the program's graphs are one module

    def no_compiling(text):
        raise AssertionError("compiled again despite the cache")
    monkeypatch.setattr(jit, "compile_ir", no_compiling)
    again = graphc.compile_file("models/backprop_example.nn", backend="llvm")
    again.compile()
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(again.forward(x=x)["f"], program.forward(x=x)["f"])


def test_generated_code_targets_the_host_cpu():
    llvm = pytest.importorskip("llvmlite.binding")
    from graphc.backends import host
    from graphc.backends.llvm import jit
    tm = jit.target_machine()
    assert llvm.get_host_cpu_name() in host.cpu_description()
    features = llvm.get_host_cpu_features().flatten()
    asm = tm.emit_assembly(jit.optimized_module(_vector_add_ir()))
    if "+avx2" in features:
        assert "ymm" in asm or "zmm" in asm     # 256/512-bit registers, not plain SSE2


def _vector_add_ir() -> str:
    program = graphc.compile_source("""
        model m { input x: f32[N, 64]  param W: f32[64] = zeros()  output y = relu(x + W) }""",
                                    backend="llvm")
    return program._executors["forward"].source()


def test_build_emits_llvm_source_and_stats(tmp_path, capsys):
    out = tmp_path / "src"
    assert main(["build", "models/mnist_mlp.nn", "--backend", "llvm", "--emit-source", str(out),
                 "--stats"]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["mnist_mlp.ll"]
    ir = (out / "mnist_mlp.ll").read_text()
    for graph in ("forward", "evaluate", "loss_and_grads", "train_step"):
        assert f"define i32 @graph_main_{graph}(" in ir
    assert "W1#exp_avg" in ir
    # forward's kernels are evaluate's too: each is defined once
    defined = [line.split("@")[1].split("(")[0] for line in ir.splitlines()
               if line.startswith("define internal")]
    assert len(defined) == len(set(defined))
    assert "train_step" in text and "MFLOP" in text and "peak MB" in text


def test_dump_after_fuse_prints_the_plan(tmp_path, capsys):
    assert main(["build", "models/backprop_example.nn", "--dump-after", "fuse", "--stats"]) == 0
    text = capsys.readouterr().out
    assert "; kernel plan of forward" in text and "sigmoid(" in text and "(matmul" in text


def test_build_without_output_or_report_is_a_usage_error(capsys):
    assert main(["build", "models/backprop_example.nn"]) == 2
    assert "needs -o DIR" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_concurrent_calls_from_threads_are_correct(backend):
    """The llvm call releases the GIL and both executors reuse buffers: runs must not overlap."""
    from concurrent.futures import ThreadPoolExecutor
    program = graphc.compile_file("models/mnist_mlp.nn", backend=backend)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((33, 784)).astype(np.float32) for _ in range(8)]
    want = [program.forward(x=x)["logp"] for x in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda x: program.forward(x=x)["logp"], batches))
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


def test_outputs_that_are_inputs_or_views_come_back_in_order():
    src = """
    model m {
        input x: f32[4, 3]
        param W: f32[3, 2] = normal()
        output y = x
        output z = transpose(x @ W)
        output s = sum(x)
    }"""
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    results = []
    for backend in ("numpy", "llvm"):
        program = graphc.compile_source(src, backend=backend)
        program.params["W"] = np.arange(6, dtype=np.float32).reshape(3, 2)
        results.append(program.forward(x=x))
    numpy_out, llvm_out = results
    assert list(llvm_out) == list(numpy_out) == ["y", "z", "s"]
    for name in numpy_out:
        np.testing.assert_allclose(llvm_out[name], numpy_out[name], rtol=1e-6)
    assert llvm_out["y"] is not x and np.shares_memory(llvm_out["y"], x) is False


def test_matrix_products_run_as_loops_where_no_blas_was_found():
    """jit.blas() is empty when numpy links no CBLAS graphc recognizes: products must still run."""
    program = graphc.compile_file("models/mnist_mlp.nn", backend="llvm")
    reference = graphc.compile_file("models/mnist_mlp.nn")
    program.compile()
    for ex in program._executors.values():
        ex._blas[0] = ex._blas[1] = None
    x = np.random.default_rng(1).standard_normal((64, 784)).astype(np.float32)
    np.testing.assert_allclose(program.forward(x=x)["logp"], reference.forward(x=x)["logp"],
                               rtol=1e-5, atol=1e-5)


def test_matrix_products_of_overlapping_rows_run_as_loops(monkeypatch):
    """A view whose rows overlap (a window view; a broadcast, as the gradient of a sum over
    rows is) is no matrix a BLAS reads: the leading dimension was raised to the row length, and
    llvm read past the rows (NaN, or wrong numbers). The planner copies such operands first
    where it sees them (next test); the code generator's own check, tested here with that copy
    turned off, sends any that reach it to the generated loop."""
    from graphc.backends.kernels import fuse
    monkeypatch.setattr(fuse._Planner, "_matrix", lambda self, node, layout: layout)
    from graphc.ir import ops as op_table
    from graphc.ir.node import Graph
    from graphc.ir.types import DType, TensorType
    from graphc.passes import PipelineOptions, run_pipeline
    from graphc.runtime import Program

    def source(name, shape):
        return op_table.source("input", TensorType(DType.f32, shape), name=name)
    x, w = source("x", (8, 300)), source("w", (64, 40))
    windows = op_table.apply("window", [x], {"kernel": [64], "stride": [1], "dilation": [1]})
    v, u = source("v", (40,)), source("u", (40, 50))
    rows = op_table.apply("broadcast_to", [v], {"shape": (64, 40)})
    graph = run_pipeline(Graph("t", (("windows", op_table.apply("matmul", [windows, w])),
                                      ("rows", op_table.apply("matmul", [rows, u])))),
                         PipelineOptions(verify=True))
    rng = np.random.default_rng(0)
    feeds = {"x": (8, 300), "w": (64, 40), "v": (40,), "u": (40, 50)}
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in feeds.items()}
    want = Program("t", {"forward": graph}, {}, {}, backend="numpy").forward(**feeds)
    got = Program("t", {"forward": graph}, {}, {}, backend="llvm").forward(**feeds)
    for name in ("windows", "rows"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_a_products_operand_that_no_blas_reads_is_copied_first():
    """Operands no BLAS reads as a matrix are copied in order first, once each, so the products
    run through the BLAS instead of the loop: a split reshape of a transposed matrix (both
    matrix axes strided), a broadcast (the gradient of a sum over a sequence), a window view
    (overlapping rows). Results as numpy's."""
    from graphc.ir import ops as op_table
    from graphc.ir.node import Graph
    from graphc.ir.types import DType, TensorType
    from graphc.passes import PipelineOptions, run_pipeline
    from graphc.runtime import Program

    def source(name, shape):
        return op_table.source("input", TensorType(DType.f32, shape), name=name)
    x, w, v, u = source("x", (64, 288)), source("w", (8, 5)), source("v", (40,)), source("u", (40, 50))
    split = op_table.apply("reshape", [op_table.apply("transpose", [x], {"axes": (1, 0)})],
                           {"shape": (288, 8, 8)})
    rows = op_table.apply("broadcast_to", [v], {"shape": (64, 40)})
    windows = op_table.apply("window", [source("z", (8, 300))],
                             {"kernel": [40], "stride": [1], "dilation": [1]})
    outputs = (("split", op_table.apply("matmul", [split, w])),
               ("rows", op_table.apply("matmul", [rows, u])),
               ("rows_again", op_table.apply("matmul", [rows, op_table.apply("neg", [u])])),
               ("windows", op_table.apply("matmul", [windows, u])))
    graph = run_pipeline(Graph("t", outputs), PipelineOptions(verify=True))
    plan = plan_kernels(graph, ordered=True)
    products = [k for k in plan.kernels if k.matmul]
    assert len(products) == 4
    copies = {s.access.buffer for k in plan.kernels if k.name.endswith("_copy") for s in k.stores}
    # every product's left operand is a copy, laid out row-major; the broadcast is copied once
    # for its two products
    assert {k.loads[0].buffer for k in products} == copies and len(copies) == 3
    rng = np.random.default_rng(0)
    feeds = {"x": (64, 288), "w": (8, 5), "v": (40,), "u": (40, 50), "z": (8, 300)}
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in feeds.items()}
    want = Program("t", {"forward": graph}, {}, {}, backend="numpy").forward(**feeds)
    got = Program("t", {"forward": graph}, {}, {}, backend="llvm").forward(**feeds)
    for name, _ in outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_object_cache_key_is_the_same_in_every_process():
    # The key hashes the kernel plans' repr: it must not depend on string hashing (set order).
    script = ("import graphc; p = graphc.compile_file('models/digits_mlp.nn', backend='llvm'); "
              "print(next(iter(p._executors.values()))._code.identity())")
    keys = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2)}
    assert len(keys) == 1 and "KernelPlan(" in keys.pop()


def test_build_command_caches_code_without_loading_it(tmp_path, monkeypatch):
    from graphc.backends.llvm import jit
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["build", "models/backprop_example.nn", "--backend", "llvm", "-o", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "cache" / "llvm").glob("*.objs"))) == 1

    def no_loading(*args):
        raise AssertionError("graphc build loaded or compiled code the cache already holds")
    monkeypatch.setattr(jit, "Compiled", no_loading)
    monkeypatch.setattr(jit, "compile_ir", no_loading)
    assert main(["build", "models/backprop_example.nn", "--backend", "llvm", "-o", str(tmp_path / "b")]) == 0


def test_an_unchanged_build_is_copied_from_the_build_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.nn"
    model.write_text(Path("models/digits_mlp.nn").read_text())
    build = ["build", str(model), "--backend", "llvm"]
    assert main(build + ["-o", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    import graphc.api
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again although nothing changed")
    monkeypatch.setattr(graphc.api, "build_program", no_compiling)
    assert main(build + ["-o", str(tmp_path / "b")]) == 0
    again = capsys.readouterr().out
    assert again == first.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    for name in ("graph.json", "params.npz", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    graphc.load_artifact(tmp_path / "b")            # a whole, loadable artifact
    # Any change to the source, the options, or the kernels leaving the cache builds again.
    for change in (lambda: model.write_text(model.read_text() + "\n# edited\n"),
                   lambda: build.extend(["--seed", "7"]),
                   lambda: [p.unlink() for p in (tmp_path / "cache" / "llvm").glob("*.objs")]):
        change()
        assert main(build + ["-o", str(tmp_path / "c")]) == 70   # graphc's internal-error status
        assert "compiled again" in capsys.readouterr().err


def test_a_per_channel_sum_runs_along_memory_and_splits_across_threads():
    """A convolution's bias gradient sums the image gradient [N, C, H, W] over N, H and W; the
    product leaves it stored [C, N, H, W], so the llvm backend runs it as a reduction over
    trailing axes (channels outermost: each channel's terms in one run, split across threads);
    a row-major [N, F] summed over N keeps its order."""
    from graphc.backends.kernels.ir import memory_order
    from graphc.backends.llvm.threads import splittable
    program = graphc.compile_file("models/mnist_cnn.nn")
    plan = plan_kernels(program.graphs["train_step"], program.updates("train_step"), ordered=True)
    sums = {k.space: k for k in plan.kernels if k.reduce_axes and k.matmul is None}
    channels = sums[((1, ("N",)), (64, ()), (24, ()), (24, ()))]
    assert channels.reduce_axes == (0, 2, 3)
    ordered = memory_order(channels)
    assert ordered.space == ((64, ()), (1, ("N",)), (24, ()), (24, ()))
    assert ordered.reduce_axes == (1, 2, 3)
    assert splittable(coalesce(ordered), lambda b: b)
    rows = sums[((1, ("N",)), (128, ()))]          # linear(128)'s bias gradient
    assert rows.reduce_axes == (0,) and memory_order(rows) is rows
    # a row-major [N, 256] times a broadcast [256], summed over N (a per-feature scale's
    # gradient): the broadcast load does not decide, the rows are read in order
    from graphc.ir import ops as op_table
    from graphc.ir.node import Graph
    from graphc.ir.types import DType, TensorType
    from graphc.passes import PipelineOptions, run_pipeline
    v = op_table.source("input", TensorType(DType.f32, (256,)), name="v")
    x = op_table.source("input", TensorType(DType.f32, ("N", 256)), name="x")
    total = op_table.apply("sum", [op_table.apply("mul", [v, x])], {"axis": 0})
    graph = run_pipeline(Graph("t", (("s", total),)), PipelineOptions(verify=True))
    (kernel,) = [k for k in plan_kernels(graph, ordered=True).kernels if k.reduce_axes]
    assert memory_order(kernel) is kernel


@pytest.mark.parametrize("optimizer", ["adam(lr=1e-3)", "sgd(lr=0.05)", "adagrad(lr=0.05)",
                                       "sgd(lr=0.05, momentum=0.9)"])
def test_every_update_of_a_cnn_is_written_in_place(optimizer):
    """Each parameter's update (and its optimizer state's) is written over it, also a
    convolution weight whose gradient the product leaves transposed (the update stores
    row-major where it reads the parameter) and one with an axis of size 1 ([32, 1, 3, 3])."""
    source = Path("models/mnist_cnn.nn").read_text().replace("adam(lr=1e-3)", optimizer)
    program = graphc.compile_source(source)
    plan = plan_kernels(program.graphs["train_step"], program.updates("train_step"), ordered=True)
    updates = [(name, access) for name, access, _, _ in plan.outputs if name.startswith("new ")]
    assert len(updates) >= 8
    assert [name for name, access in updates if access.buffer not in plan.aliases] == []


def test_a_reshape_that_only_splits_axes_of_a_strided_view_is_a_view():
    """A convolution's weight gradient comes out of its product as [C*kh*kw, O] and is read as
    [O, C, kh, kw]: the transposed view reshaped by splitting an axis needs no copy kernel. A
    reshape that merges axes of a strided view does (its elements must be in order)."""
    from graphc.backends.kernels.fuse import _split_strides
    # [288, 64] read transposed: [64, 288] with strides (1, 64), split into [64, 32, 3, 3]
    assert _split_strides(((1, ()), (64, ())), (64, 288), (64, 32, 3, 3)) == \
        ((1, ()), (576, ()), (192, ()), (64, ()))
    # a symbolic axis split in three, and axes of size 1 anywhere
    assert _split_strides(((1, ()), (288, ())), (288, "576*N"), (288, 1, "N", 24, 24, 1)) == \
        ((1, ()), (0, ()), (165888, ()), (6912, ()), (288, ()), (0, ()))
    assert _split_strides(((1, ()), (64, ())), (64, 288), (64 * 288,)) is None     # a merge
    assert _split_strides(((1, ()), (64, ())), (64, 288), (64, 5, 57)) is None      # no split
    assert _split_strides(((0, ()), (1, ())), (64, 40), (2, 32, 40)) is None        # a broadcast
    program = graphc.compile_file("models/mnist_cnn.nn")
    plan = plan_kernels(program.graphs["train_step"], program.updates("train_step"), ordered=True)
    assert not [k for k in plan.kernels if k.name.endswith("_copy") and len(k.space) == 2]
