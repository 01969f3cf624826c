"""Per-op knowledge, one registry each: every primitive is lowered by each backend or declared
unsupported there, the fast numpy backend's ufuncs come from the op table, the LLVM JIT's C math
functions from the LLVM lowering table, and a missing entry names the op, dtype and node."""
from __future__ import annotations

import numpy as np
import pytest
from backend_cases import OP_CASES
from conftest import MODELS

import graphc
from graphc.backends.cuda import codegen as cuda_codegen
from graphc.backends.kernels import plan_kernels
from graphc.backends.kernels.ir import Op, walk
from graphc.backends.kernels.tables import PLANNED
from graphc.backends.llvm import codegen as llvm_codegen
from graphc.backends.llvm import executor as llvm_executor
from graphc.backends.llvm import lowering as llvm_lowering
from graphc.backends.llvm import threads as llvm_threads
from graphc.backends.numpy import calls as numpy_calls
from graphc.compiler import check_source, program_graphs
from graphc.errors import GraphcError
from graphc.ir import OPS

PRIMITIVES = sorted(name for name, op in OPS.items() if not op.is_composite)
COMPILED = {"llvm": (llvm_lowering.LOWER, llvm_lowering.UNSUPPORTED),
            "cuda": (cuda_codegen.LOWER, cuda_codegen.UNSUPPORTED)}
EXP_MODEL = "model t {\n    input x: f32[N, 3]\n    output y = exp(x) * 2.0\n}\n"


@pytest.mark.parametrize("backend", sorted(COMPILED))
def test_every_primitive_is_lowered_or_declared_unsupported(backend):
    lower, unsupported = COMPILED[backend]
    assert not set(lower) & set(unsupported), "both lowered and unsupported"
    assert not set(lower) & PLANNED, "lowered by the backend and planned as structure"
    assert set(lower) | set(unsupported) | PLANNED <= set(PRIMITIVES), "entries for unknown ops"
    missing = set(PRIMITIVES) - set(lower) - set(unsupported) - PLANNED
    assert not missing, f"{backend}: no lowering and not declared unsupported: {sorted(missing)}"


def test_the_numpy_backend_runs_every_primitive_by_its_reference():
    for name in PRIMITIVES:
        op = OPS[name]
        assert op.kind == "source" or op.numpy is not None or name in numpy_calls.UNSUPPORTED, name


def test_ufuncs_come_from_the_op_table():
    assert numpy_calls.UFUNCS["exp"] is np.exp and numpy_calls.UFUNCS["matmul"] is np.matmul
    assert numpy_calls.REDUCES["sum"] == np.add.reduce and "sum" not in numpy_calls.UFUNCS
    for name, fn in numpy_calls.UFUNCS.items():
        assert OPS[name].ufunc is fn


def test_the_jits_math_functions_derive_from_the_llvm_table():
    names = llvm_lowering.libm_functions()
    assert {"exp", "log1p", "tanh", "erf", "pow", "fmax", "fmin"} <= set(names)
    for op in ("log1p", "tanh", "erf"):          # called in the C library, never an intrinsic
        assert llvm_lowering.LOWER[op].libm == (op,)


def test_every_c_function_the_llvm_code_declares_is_registered_with_the_jit():
    """The op cases' kernels (every elementwise op, f32 and f64) as one module: what it declares
    besides LLVM intrinsics is a C math function some table entry says it calls, or one of the
    thread pool's (threads.C_FUNCTIONS)."""
    plans = {}
    for case in OP_CASES:
        for dtype in ("f32", "f64") if case.floats else ("f32",):
            program = graphc.compile_source(case.source(dtype))
            plans[f"{case.name}_{dtype}".replace("-", "_")] = plan_kernels(program.graphs["forward"])
    declared = {fn for fn in llvm_codegen.build_module(plans).declarations if not fn.startswith("llvm.")}
    registered = {name + suffix for name in llvm_lowering.libm_functions() for suffix in ("", "f")}
    registered |= set(llvm_threads.C_FUNCTIONS)
    assert declared and declared <= registered, sorted(declared - registered)


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_the_planner_leaves_only_table_ops_to_the_backends(path):
    """What reaches a backend as a kernel expression is an op of its lowering table."""
    checked = check_source(path.read_text(), str(path))
    ir = checked.pick(None)
    graphs, _, contract = program_graphs(ir, checked.trains.get(ir.name))
    for key, graph in graphs.items():
        plan = plan_kernels(graph, contract.updates if contract and key == "train_step" else ())
        ops = {e.op for k in plan.kernels for e in walk([s.expr for s in k.stores])
               if isinstance(e, Op)}
        for backend, (lower, _) in COMPILED.items():
            assert ops <= set(lower), f"{path.stem} {key} on {backend}: {sorted(ops - set(lower))}"


def test_a_missing_lowering_names_the_op_dtype_and_node(monkeypatch):
    monkeypatch.delitem(llvm_lowering.LOWER, "exp")
    with pytest.raises(AssertionError, match=r"internal error: the llvm backend has no lowering "
                                             r"for exp f32 \(<exp> at <string>:3:16\)"):
        graphc.compile_source(EXP_MODEL, backend="llvm")


def test_a_miss_while_rendering_names_the_op_dtype_operands_and_kernel(monkeypatch):
    program = graphc.compile_source(EXP_MODEL)
    plans = {"forward": plan_kernels(program.graphs["forward"])}
    monkeypatch.delitem(llvm_lowering.LOWER, "exp")
    with pytest.raises(AssertionError, match=r"llvm backend failed to render exp f32 \(f32\) in k0_"):
        llvm_codegen.build_module(plans)
    monkeypatch.delitem(cuda_codegen.LOWER, "exp")
    with pytest.raises(AssertionError, match=r"cuda backend failed to render exp f32 \(f32\) in k0_"):
        cuda_codegen.render_module(plans)


def test_an_unsupported_op_is_the_users_error_at_its_node(monkeypatch):
    monkeypatch.setattr(llvm_executor, "UNSUPPORTED", frozenset({"exp"}))
    with pytest.raises(GraphcError, match=r"3:16: error: the llvm backend does not run exp"):
        graphc.compile_source(EXP_MODEL, backend="llvm")
