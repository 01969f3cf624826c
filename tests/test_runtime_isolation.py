"""graphc.runtime runs built artifacts without the compiler: it imports only what an allow-list
names (the core and backends layers, itself, numpy, the standard library and a few optional
packages), and a built artifact runs forward and trains in a process where the compiler, the CLI
and lark cannot be imported at all."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_layers import LAYERS

import graphc

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DIR = ROOT / "runtime"          # installed as graphc.runtime
RUNTIME_PACKAGE = "graphc.runtime"
# What the runtime may import: the layers below it (tests/test_layers.py) and itself, numpy, the
# standard library, tqdm (the progress bar), and what is imported only when used: scikit-learn
# (the digits data set), llvmlite and pycuda (through the llvm and cuda backends), mpi4py
# (runtime/distributed.py, a data-parallel run's ranks).
ALLOWED_GRAPHC = LAYERS["core"] + LAYERS["backends"] + LAYERS["runtime"]
ALLOWED_PACKAGES = ("numpy", "tqdm", "sklearn", "llvmlite", "pycuda", "mpi4py")
# Made unimportable in the isolated process: lark and every module of the compiler and CLI layers
# (the package graphc itself stays: it is every module's parent, and imports nothing eagerly).
FORBIDDEN = ("lark",) + tuple(m for m in LAYERS["compiler"] + LAYERS["cli"] if m != "graphc")


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _is_allowed(module: str) -> bool:
    top = module.partition(".")[0]
    if top == "graphc":
        return _under(module, ALLOWED_GRAPHC)
    return top in sys.stdlib_module_names or top in ALLOWED_PACKAGES


def _resolve(module: str | None, level: int, package: str) -> str:
    """The absolute name of `from <level dots><module> import ...` inside `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join(base + ([module] if module else []))


def imported_modules(source: str, package: str = RUNTIME_PACKAGE) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in `source` (module level, functions, classes,
    try blocks), including `from pkg import submodule` and importlib/__import__ with a literal."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, package)
            if base != "graphc":   # every graphc module's parent, importing nothing itself:
                found.append((node.lineno, base))   # `from graphc import x` is judged by graphc.x
            found.extend((node.lineno, f"{base}.{alias.name}" if base else alias.name)
                         for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_detector_sees_every_form_of_import():
    source = textwrap.dedent("""
        import lark
        import graphc.frontend.parser as p
        from graphc import compiler
        from graphc.cli import main
        def f():
            from .. import frontend
        class C:
            def g(self):
                import importlib
                importlib.import_module("lark.lexer")
        try:
            __import__("graphc.compiler")
        except ImportError:
            pass
        import numpy
        from graphc.ir import serialize
        from . import program
    """)
    bad = sorted({m for _, m in imported_modules(source) if not _is_allowed(m)})
    assert bad == ["graphc.cli", "graphc.cli.main", "graphc.compiler", "graphc.frontend",
                   "graphc.frontend.parser", "lark", "lark.lexer"]
    good = {m for _, m in imported_modules(source)}
    assert {"numpy", "graphc.ir.serialize", "graphc.runtime.program"} <= good


def test_allow_list():
    assert _is_allowed("graphc.ir.serialize") and _is_allowed("graphc.backends.llvm.executor")
    assert _is_allowed("graphc.runtime.train") and _is_allowed("json") and _is_allowed("numpy.lib")
    for module in ("graphc", "graphc.optim", "graphc.passes.fold", "graphc.autodiff", "lark",
                   "graphc.train_cli", "graphc.lints", "networkx", "torch"):
        assert not _is_allowed(module), module


def test_runtime_sources_import_only_what_the_allow_list_names():
    files = sorted(RUNTIME_DIR.rglob("*.py"))
    assert files, f"no Python files under {RUNTIME_DIR}"
    offenders = []
    for path in files:
        # the package a module's relative imports resolve against (an __init__ is its own)
        package = ".".join((RUNTIME_PACKAGE,) + path.relative_to(RUNTIME_DIR).parts[:-1])
        for line, module in imported_modules(path.read_text(encoding="utf-8"), package):
            if not _is_allowed(module):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not offenders, "graphc.runtime imports what it may not:\n" + "\n".join(offenders)


def test_graphc_runtime_is_the_runtime_folder():
    import graphc.runtime
    assert Path(graphc.runtime.__file__).resolve().parent == RUNTIME_DIR.resolve()


_LOAD_AND_RUN = """
import hashlib, json, sys
import numpy as np
{prelude}
import graphc.runtime
# every module of the runtime imports (the training loop's included)
from graphc.runtime import augment, checkpoint, csv_data, data, norms, runs, schedules, train
FORBIDDEN = {forbidden!r}
results = {{}}
for backend in ("numpy", "llvm"):
    program = graphc.runtime.load_artifact(sys.argv[1], backend=backend)
    x, y = np.load(sys.argv[2]), np.load(sys.argv[3])
    out = program.forward(x=x)
    assert out["logp"].shape == (len(x), 10), out["logp"].shape
    losses = [float(program.train_step(x=x, y=y)) for _ in range(5)]
    results[backend] = {{"forward": hashlib.sha256(out["logp"].tobytes()).hexdigest(),
                        "losses": losses}}
loaded = sorted(m for m in sys.modules
                if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
print(json.dumps({{"loaded": loaded, "results": results}}))
"""

_BLOCKER = """
import importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in {forbidden!r}):
            raise ImportError(f"blocked by the test: {{name}}")
        return None
sys.meta_path.insert(0, _Block())
"""

MLP = ROOT / "models" / "mnist_mlp.nn"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    """An artifact folder of mnist_mlp and a batch (x, y) as .npy files."""
    tmp = tmp_path_factory.mktemp("isolation")
    graphc.compile_file(MLP).save(tmp / "art")
    rng = np.random.default_rng(0)
    np.save(tmp / "x.npy", rng.standard_normal((8, 784)).astype(np.float32))
    np.save(tmp / "y.npy", rng.integers(0, 10, 8))
    return tmp / "art", tmp / "x.npy", tmp / "y.npy"


def _run(prelude: str, built: tuple[Path, Path, Path], cwd: Path) -> dict:
    script = _LOAD_AND_RUN.format(prelude=prelude, forbidden=FORBIDDEN)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, built)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected(built) -> dict:
    """The same runs on programs the compiler builds in this process."""
    _, x_file, y_file = built
    x, y = np.load(x_file), np.load(y_file)
    results = {}
    for backend in ("numpy", "llvm"):
        program = graphc.compile_file(MLP, backend=backend)
        out = program.forward(x=x)
        results[backend] = {"forward": hashlib.sha256(out["logp"].tobytes()).hexdigest(),
                            "losses": [float(program.train_step(x=x, y=y)) for _ in range(5)]}
    return results


def test_loading_and_running_an_artifact_imports_no_compiler(built, tmp_path):
    pytest.importorskip("llvmlite")
    result = _run("", built, tmp_path)
    assert result["loaded"] == [], f"graphc.runtime pulled in {result['loaded']}"


def test_runtime_runs_and_trains_when_the_compiler_cannot_be_imported(built, tmp_path):
    """Forward and five train steps on the numpy and llvm backends, with lark, the front end,
    passes, autodiff, the optimizer builders, the driver and the CLI unimportable; the results
    are bit for bit those of the programs the compiler builds."""
    pytest.importorskip("llvmlite")
    result = _run(_BLOCKER.format(forbidden=FORBIDDEN), built, tmp_path)
    assert result["loaded"] == []
    assert result["results"] == _expected(built)
