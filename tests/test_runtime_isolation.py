"""graphc.runtime runs built artifacts without the compiler: no lark, no front end, no driver."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import graphc

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DIR = ROOT / "runtime"          # installed as graphc.runtime
RUNTIME_PACKAGE = "graphc.runtime"
FORBIDDEN = ("lark", "graphc.frontend", "graphc.compiler", "graphc.cli")


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


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
            found.append((node.lineno, base))
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
    bad = sorted({m for _, m in imported_modules(source) if _is_forbidden(m)})
    assert bad == ["graphc.cli", "graphc.cli.main", "graphc.compiler", "graphc.frontend",
                   "graphc.frontend.parser", "lark", "lark.lexer"]
    good = {m for _, m in imported_modules(source)}
    assert {"numpy", "graphc.ir.serialize", "graphc.runtime.program"} <= good


def test_runtime_sources_import_no_compiler_module():
    files = sorted(RUNTIME_DIR.rglob("*.py"))
    assert files, f"no Python files under {RUNTIME_DIR}"
    offenders = []
    for path in files:
        # the package a module's relative imports resolve against (an __init__ is its own)
        package = ".".join((RUNTIME_PACKAGE,) + path.relative_to(RUNTIME_DIR).parts[:-1])
        for line, module in imported_modules(path.read_text(encoding="utf-8"), package):
            if _is_forbidden(module):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not offenders, "graphc.runtime must not import the compiler:\n" + "\n".join(offenders)


def test_graphc_runtime_is_the_runtime_folder():
    import graphc.runtime
    assert Path(graphc.runtime.__file__).resolve().parent == RUNTIME_DIR.resolve()


_LOAD_AND_RUN = """
import json, sys
import numpy as np
{prelude}
import graphc.runtime
program = graphc.runtime.load_artifact(sys.argv[1])
out = program.forward(x=np.ones((2, 784), dtype=np.float32))
assert out["logp"].shape == (2, 10), out["logp"].shape
loaded = sorted(m for m in sys.modules
                if m == "lark" or m.startswith("lark.") or m.startswith("graphc.frontend")
                or m in ("graphc.compiler", "graphc.cli"))
print(json.dumps({{"loaded": loaded}}))
"""

_BLOCKER = """
import importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lark" or name.startswith(("lark.", "graphc.frontend", "graphc.compiler",
                                               "graphc.cli")):
            raise ImportError(f"blocked by the test: {name}")
        return None
sys.meta_path.insert(0, _Block())
"""


def _artifact(tmp_path: Path) -> Path:
    folder = tmp_path / "art"
    graphc.compile_file(ROOT / "models" / "mnist_mlp.nn").save(folder)
    return folder


def _run(script: str, folder: Path, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loading_and_running_an_artifact_imports_no_compiler(tmp_path):
    folder = _artifact(tmp_path)
    result = _run(_LOAD_AND_RUN.format(prelude=""), folder, tmp_path)
    assert result["loaded"] == [], f"graphc.runtime pulled in {result['loaded']}"


def test_runtime_works_when_the_compiler_cannot_be_imported(tmp_path):
    folder = _artifact(tmp_path)
    result = _run(_LOAD_AND_RUN.format(prelude=_BLOCKER), folder, tmp_path)
    assert result["loaded"] == []
