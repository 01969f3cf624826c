"""The cuda backend without a GPU: the CUDA C rendered from every bundled model's and every op
case's kernel plans compiles with nvcc for sm_90 without a warning, the GEMM tiles spill no
registers, and the renderer's pieces do what they say. Running the kernels needs a GPU and
pycuda (tests/test_cuda_backend.py)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from backend_cases import OP_CASES
from conftest import LARGE_MODELS

import graphc
from graphc.backends.cuda import codegen
from graphc.backends.kernels import plan_kernels
from graphc.backends.kernels.memory import plan_arena
from graphc.cli import main
from graphc.ir.primitives import hash32
from graphc.ir.types import DType

REPO = Path(__file__).resolve().parents[1]
MODELS = [m for m in sorted((REPO / "models").glob("*.nn")) if m.stem not in LARGE_MODELS]  # (conftest)
ARCH = "sm_90"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")


def _nvcc(source: str, tmp_path: Path, name: str, *flags: str, output: str = "cubin"
          ) -> subprocess.CompletedProcess:
    """nvcc on `source` with warnings as errors. `output` "cubin": the device code alone, as the
    executor compiles it (graphc/backends/cuda/executor.py: compile_cubin, pycuda's --cubin);
    "c": an object file, host side included, as a program that builds an emitted .cu does."""
    cu = tmp_path / f"{name}.cu"
    cu.write_text(source)
    target = tmp_path / (name + (".cubin" if output == "cubin" else ".o"))
    return subprocess.run([NVCC, f"-arch={ARCH}", f"-{output}", str(cu), "-o", str(target),
                           "-Werror", "all-warnings", *flags], capture_output=True, text=True)


def _plans(program) -> dict:
    return {key: plan_kernels(graph, program.updates(key)) for key, graph in program.graphs.items()}


@needs_nvcc
@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_every_models_kernels_compile_without_warnings(path, tmp_path):
    text, launches = codegen.render_module(_plans(graphc.compile_file(path)))
    done = _nvcc(text, tmp_path, path.stem, "-Xptxas", "-v")
    assert done.returncode == 0 and "warning" not in done.stderr.lower(), done.stderr[-3000:]
    # Every launch names a kernel of the file, and every matrix product became a GEMM tile.
    names = set(re.findall(r'__global__ void (?:__launch_bounds__\([\d, ]+\) )?(\w+)\(', text))
    assert {launch.kernel for graph in launches.values() for launch in graph} == names
    _assert_gemm_tiles_do_not_spill(done.stderr)


def _assert_gemm_tiles_do_not_spill(ptxas: str) -> None:
    """ptxas -v prints, per function, its name and then its spill counts."""
    current, seen = None, 0
    for line in ptxas.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m[1]
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current and current.startswith("gc_matmul"):
            seen += 1
            assert m[1] == m[2] == "0", f"{current} spills registers: {line.strip()}"
    assert seen, "no GEMM kernel in the ptxas report"


@needs_nvcc
def test_every_op_cases_kernels_compile_without_warnings(tmp_path):
    module = codegen.Module()
    for case in OP_CASES:
        for dtype in (("f32", "f64") if case.floats else ("f32",)):
            program = graphc.compile_source(case.source(dtype))
            for key, plan in _plans(program).items():
                module.render_graph(f"{case.name}_{dtype}_{key}", plan)
    done = _nvcc(module.text(), tmp_path, "op_cases")
    assert done.returncode == 0 and "warning" not in done.stderr.lower(), done.stderr[-3000:]


def _kinds(path: str) -> dict[str, str]:
    program = graphc.compile_file(path)
    _, launches = codegen.render_module(_plans(program))
    return {launch.kernel.split("_")[1]: launch.kind for launch in launches["train_step"]}


def test_each_kernel_gets_the_shape_of_launch_its_work_wants():
    program = graphc.compile_file("bench/models/mnist_mlp.nn")
    text, launches = codegen.render_module(_plans(program))
    kinds = {launch.kind for launch in launches["train_step"]}
    assert kinds == {"points", "rows", "outputs", "gemm"}
    plan = plan_kernels(program.graphs["train_step"], program.updates("train_step"))
    # Every kernel of the plan runs in exactly one launch; fewer launches than kernels.
    ran = sorted(i for launch in launches["train_step"] for i in launch.kernels)
    assert ran == list(range(len(plan.kernels)))
    assert len(launches["train_step"]) < len(plan.kernels)
    # Softmax rows reduce with warp shuffles; bias gradients (columns) with a thread per column.
    assert "__shfl_down_sync" in text
    for launch in launches["train_step"]:
        head = plan.kernels[launch.index]
        assert launch.index == launch.kernels[0]
        if launch.kind == "gemm":
            assert head.matmul is not None
        if launch.kind == "outputs":
            assert 0 in head.reduce_axes


def _written_params(plan, launch) -> set[str]:
    real = {b.id: plan.buffers[plan.aliases.get(b.id, b.id)] for b in plan.buffers}
    return {real[s.access.buffer].name for i in launch.kernels for s in plan.kernels[i].stores
            if real[s.access.buffer].kind == "param"}


@pytest.mark.parametrize("path", ["bench/models/mnist_mlp.nn", "models/digits_adamw.nn",
                                  "models/digits_nesterov.nn", "models/digits_rmsprop.nn",
                                  "models/digits_adagrad.nn"])
def test_the_optimizer_updates_every_parameter_in_at_most_one_launch_besides_gemms(path):
    """Weights are updated in the epilogue of the GEMM computing their gradient; what is left
    (the biases) in one launch over the concatenation of their spaces."""
    program = graphc.compile_file(path)
    plan = plan_kernels(program.graphs["train_step"], program.updates("train_step"))
    _, launches = codegen.render_module({"train_step": plan})
    updating = [launch for launch in launches["train_step"] if _written_params(plan, launch)]
    assert set().union(*(_written_params(plan, launch) for launch in updating)) == set(program.params)
    others = [launch for launch in updating if launch.kind != "gemm"]
    assert len(others) <= 1
    weights = {name for name, value in program.params.items() if value.ndim == 2}
    for launch in updating:
        if launch.kind == "gemm":
            assert len(launch.kernels) >= 2 and _written_params(plan, launch) <= weights
    if others:
        (grouped,) = others
        assert grouped.kind == "points" and len(grouped.kernels) == len(program.params) - len(weights)
        assert grouped.kernel.startswith("gc_updates_")


def test_gemm_epilogues_fuse_bias_activation_and_the_relu_mask():
    program = graphc.compile_file("bench/models/mnist_mlp.nn")
    plans = _plans(program)
    text, launches = codegen.render_module(plans)
    plan = plans["train_step"]
    ops = [{n.op for i in launch.kernels[1:] for n in plan.kernels[i].nodes}
           for launch in launches["train_step"] if launch.kind == "gemm"]
    assert {"add", "relu"} <= ops[0]                # x @ W1 + b1, relu
    assert any("where" in o for o in ops)           # the gradient mask of relu
    # The product feeding an epilogue alone is never stored: the first launch writes h's
    # pre-activation (the mask reads it later) and h, not x @ W1.
    first = launches["train_step"][0]
    product = plan.kernels[first.kernels[0]].stores[0].access.buffer
    assert product not in first.buffers


def test_launch_order_keeps_the_arena_safe():
    """A launch's buffers are all alive at its position of the launch order, so the arena never
    places two of them in the same memory."""
    from graphc.backends.kernels.memory import lifetimes
    program = graphc.compile_file("bench/models/mnist_mlp.nn")
    plan = plan_kernels(program.graphs["train_step"], program.updates("train_step"))
    launched = codegen.launched(plan)
    arena = plan_arena(launched, {"N": 64})
    live = lifetimes(launched)
    sizes = {b.id: b.elements[0] * 64 ** len(b.elements[1]) * 4 for b in plan.buffers}
    for i, kernel in enumerate(launched.kernels):
        touched = sorted({a.buffer for a in kernel.loads} | {s.access.buffer for s in kernel.stores})
        spans = [(arena.offsets[b], arena.offsets[b] + sizes[b]) for b in touched if b in arena.offsets]
        assert all(live[b][0] <= i <= live[b][1] for b in touched if b in live)
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"launch {i} overlaps"


def test_f32_gemm_tiles_load_four_floats_at_once_with_a_scalar_fallback():
    program = graphc.compile_file("models/backprop_example.nn")
    text, _ = codegen.render_module(_plans(program))
    assert "reinterpret_cast<const float4*>(A + " in text and "reinterpret_cast<const float4*>(B + " in text
    assert "vec_A && " in text and "} else {" in text


@needs_nvcc
def test_tf32_gemms_use_the_tensor_cores_and_compile(tmp_path):
    program = graphc.compile_file("bench/models/mnist_mlp.nn")
    plans = _plans(program)
    text, launches = codegen.render_module(plans, precision="tf32")
    assert text.count("nvcuda::wmma::mma_sync") == len(
        {launch.kernel for graph in launches.values() for launch in graph if launch.kind == "gemm"})
    assert "__float_to_tf32" in text and "#include <mma.h>" in text
    assert "nvcuda::wmma" not in codegen.render_module(plans)[0]      # f32 is the default
    done = _nvcc(text, tmp_path, "tf32", "-Xptxas", "-v")
    assert done.returncode == 0 and "warning" not in done.stderr.lower(), done.stderr[-3000:]
    _assert_gemm_tiles_do_not_spill(done.stderr)


def test_f64_gemms_stay_on_the_fma_units_under_tf32():
    program = graphc.compile_source(
        "model m { input x: f64[N, 8]\n param W: f64[8, 4] = zeros()\n y = x @ W\n output y }")
    kernels = codegen.render_module(_plans(program), precision="tf32")[0].split("#include <mma.h>")[1]
    assert "gc_matmul" in kernels and "wmma" not in kernels and "float4" not in kernels


def test_graphs_share_their_kernels_once():
    program = graphc.compile_file("models/mnist_mlp.nn")
    text, launches = codegen.render_module(_plans(program))
    used = {launch.kernel for graph in launches.values() for launch in graph}
    assert len(re.findall(r"__global__", text)) == len(used)
    forward = {launch.kernel for launch in launches["forward"]}
    assert forward <= {launch.kernel for launch in launches["evaluate"]}


@pytest.mark.parametrize("value", [0.1, 1e-8, -3.25, 2.0 ** -24, 1e30, 0.0, 0.999])
@pytest.mark.parametrize("dtype", [DType.f32, DType.f64])
def test_float_literals_are_the_exact_value_of_the_type(value, dtype):
    text = codegen.literal(value, dtype)
    parsed = float.fromhex(text.removesuffix("f"))
    want = float(np.float32(value)) if dtype is DType.f32 else value
    assert parsed == want


def test_special_floats_have_bit_exact_spellings():
    assert codegen.literal(float("inf"), DType.f32) == f"__int_as_float({0x7F800000})"
    assert codegen.literal(float("-inf"), DType.f64) == "__longlong_as_double(-4503599627370496LL)"
    assert "__int_as_float" in codegen.literal(float("nan"), DType.f32)


def test_dropout_masks_use_the_same_hash_as_the_other_backends():
    from graphc.backends.kernels.ir import Op, walk
    program = graphc.compile_file("models/digits_mlp.nn")            # dropout(0.2)
    plans = _plans(program)
    streams = {e.attr["stream"] for plan in plans.values() for k in plan.kernels
               for e in walk(s.expr for s in k.stores) if isinstance(e, Op) and e.op == "uniform"}
    assert streams
    text, _ = codegen.render_module(plans)
    assert "x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu" in text    # lowbias32
    words = {int(w) for w in re.findall(r"gc_hash32\(\(unsigned\)key\d+ \^ (\d+)u\)", text)}
    assert words == {hash32(s + 0x9E3779B9) for s in streams}


def test_a_label_check_stops_every_later_kernel():
    program = graphc.compile_file("models/digits_mlp.nn")
    text, _ = codegen.render_module(_plans(program))
    assert "gc_fail(status, 1," in text
    starts = re.findall(r"__global__ void [^{]*\{\n((?:.*\n){4})", text)
    exit_first = ("    __shared__ int stop;\n    if (threadIdx.x == 0) stop = status[0] != 0;\n"
                  "    __syncthreads();\n    if (stop) return;\n")
    assert starts and all(body == exit_first for body in starts)


def test_build_emits_self_contained_cuda_without_pycuda(tmp_path, capsys):
    assert main(["build", "models/mnist_mlp.nn", "--backend", "cuda", "--emit-source", str(tmp_path)]) == 0
    (cu,) = tmp_path.glob("*.cu")
    assert cu.name == "mnist_mlp.cu"
    text = cu.read_text()
    assert text.startswith("// graphc: generated CUDA C") and "(train_step): " in text
    if NVCC:
        done = _nvcc(text, tmp_path, "emitted", output="c")
        assert done.returncode == 0, done.stderr[-2000:]


def test_precision_tf32_reaches_the_emitted_gemms_and_needs_the_cuda_backend(tmp_path, capsys):
    for precision in ("f32", "tf32"):
        out = tmp_path / precision
        assert main(["build", "models/mnist_mlp.nn", "--backend", "cuda", "--precision",
                     precision, "--emit-source", str(out)]) == 0
        assert ("wmma::" in (out / "mnist_mlp.cu").read_text()) == (precision == "tf32")
    capsys.readouterr()
    for argv in (["build", "models/mnist_mlp.nn", "-o", str(tmp_path / "a")],
                 ["train", "models/digits_mlp.nn", "--backend", "llvm", "--out", str(tmp_path / "r")]):
        assert main(argv + ["--precision", "tf32"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: precision tf32 runs matrix products on a GPU's tensor cores")
        assert "hint: use --backend cuda" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()


def test_training_on_cuda_without_pycuda_is_one_clear_message(capsys):
    try:
        import pycuda  # noqa: F401
        pytest.skip("pycuda is installed here; the message is for machines without it")
    except ImportError:
        pass
    code = main(["train", "models/digits_mlp.nn", "--backend", "cuda", "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert err.startswith("error: the cuda backend needs pycuda, which is not installed")
    assert "pip install -e '.[cuda]'" in err
