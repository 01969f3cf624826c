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

import graphc
from graphc.cli import main
from graphc.ir.primitives import hash32
from graphc.ir.types import DType
from graphc.kernels import plan_kernels
from graphc.runtime.cuda import codegen

REPO = Path(__file__).resolve().parents[1]
MODELS = sorted((REPO / "models").glob("*.nn"))
ARCH = "sm_90"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")


def _nvcc(source: str, tmp_path: Path, name: str, *flags: str) -> subprocess.CompletedProcess:
    cu = tmp_path / f"{name}.cu"
    cu.write_text(source)
    return subprocess.run([NVCC, f"-arch={ARCH}", "-c", str(cu), "-o", str(tmp_path / f"{name}.o"),
                           "-Werror", "all-warnings", *flags], capture_output=True, text=True)


def _plans(program) -> dict:
    return {key: plan_kernels(graph) for key, graph in program.graphs.items()}


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
    plan = plan_kernels(program.graphs["train_step"])
    assert [launch.index for launch in launches["train_step"]] == list(range(len(plan.kernels)))
    # Softmax rows reduce with warp shuffles; bias gradients (columns) with a thread per column.
    assert "__shfl_down_sync" in text
    for launch, kernel in zip(launches["train_step"], plan.kernels):
        if launch.kind == "gemm":
            assert kernel.matmul is not None
        if launch.kind == "outputs":
            assert 0 in kernel.reduce_axes


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
    from graphc.kernels.ir import Op, walk
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
        done = _nvcc(text, tmp_path, "emitted")
        assert done.returncode == 0, done.stderr[-2000:]


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
    assert "pip install 'graphc[cuda]'" in err
