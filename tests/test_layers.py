"""graphc's layers, computed from the code: every import of a graphc module (module level, in a
function, under TYPE_CHECKING) is an edge; the edges form no cycle, and each layer imports only the
layers below it (a table of layers, mirrored in docs/architecture.md: "Layers"); and a module past
500 lines says why at its top."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where each installed package's sources are (runtime/ and grammar/ install under graphc).
PACKAGE_DIRS = {"graphc": ROOT / "graphc", "graphc.runtime": ROOT / "runtime",
                "graphc.grammar": ROOT / "grammar"}

# Each module belongs to the first layer whose prefixes name it (a prefix names itself and its
# submodules). Bottom first.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("graphc.ir", "graphc.errors", "graphc.files", "graphc.cache", "graphc.targets",
             "graphc.images", "graphc.version", "graphc.options", "graphc.train_config",
             "graphc.initializers"),
    "backends": ("graphc.backends",),
    "runtime": ("graphc.runtime",),
    "compiler": ("graphc.frontend", "graphc.grammar", "graphc.passes", "graphc.autodiff",
                 "graphc.optim", "graphc.compiler", "graphc.lints"),
    "cli": ("graphc.cli", "graphc.cli_common", "graphc.cli_types", "graphc.train_cli", "graphc.steps_cli",
            "graphc.search", "graphc.search_cli", "graphc.search_results", "graphc.report",
            "graphc.report_cli", "graphc.draw", "graphc.gradcheck", "graphc.build_cache",
            "graphc.__main__", "graphc.api", "graphc.onnx", "graphc"),
}
# What each layer may import besides itself: the compiler sits on the core alone, beside the
# backends and the runtime, and hands the runtime graphs; the CLI and the top-level API use all.
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "backends": {"core"},
    "runtime": {"core", "backends"},
    "compiler": {"core"},
    "cli": {"core", "backends", "runtime", "compiler"},
}

# Edges known to break the rules, each with the change that removes it. This list only shrinks:
# an edge that is gone must leave it (test_known_edges_still_exist).
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_files() -> dict[str, Path]:
    """graphc's module names and their source files."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The module `from <level dots><module> import ...` names inside `importer`."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(source: str, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The graphc modules `source` imports anywhere: `import a.b`, `from a import b` (the module
    a.b where there is one, else a), relative imports, importlib.import_module("...")."""
    def owner(name: str) -> str | None:   # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, importer, is_package)
            names += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                      for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant):
            names.append(str(node.args[0].value))
    return {m for m in map(owner, names) if m is not None and m != importer}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py",
                             set(files))
            for name, path in files.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of `graph` with more than one member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str | None:
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None


def upward_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets
            if layer_of(b) != layer_of(a) and layer_of(b) not in MAY_IMPORT[layer_of(a)]}


def test_the_detector_resolves_every_form_of_import():
    modules = {"graphc", "graphc.ir", "graphc.ir.node", "graphc.ir.ops", "graphc.runtime",
               "graphc.runtime.program", "graphc.runtime.artifact", "graphc.cli"}
    source = """
import graphc.ir.node
from graphc.ir import ops, Node
from . import program
from .. import cli
def f():
    from graphc.runtime.artifact import load_artifact
if TYPE_CHECKING:
    import graphc.ir.ops as o
importlib.import_module("graphc.cli")
import numpy
"""
    found = imports_of(source, "graphc.runtime.train", False, modules)
    assert found == {"graphc.ir.node", "graphc.ir.ops", "graphc.ir", "graphc.runtime.program",
                     "graphc.runtime.artifact", "graphc.cli"}


def test_tarjan_finds_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_layer():
    graph = import_graph()
    assert len(graph) > 50, f"found only {len(graph)} modules: is PACKAGE_DIRS right?"
    assert [m for m in sorted(graph) if layer_of(m) is None] == []


def test_no_import_cycle():
    cycles = {frozenset(c) for c in strongly_connected(import_graph())}
    assert cycles - KNOWN_CYCLES == set(), "import cycles among graphc's modules: " + "; ".join(
        " <-> ".join(sorted(c)) for c in cycles - KNOWN_CYCLES)


def test_each_layer_imports_only_the_layers_below():
    bad = upward_edges(import_graph()) - KNOWN_UPWARD
    assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, b in sorted(bad))


def test_known_edges_still_exist():
    """A known edge that has gone must leave the lists, so they never hide a new one."""
    graph = import_graph()
    assert upward_edges(graph) >= KNOWN_UPWARD
    assert {frozenset(c) for c in strongly_connected(graph)} >= KNOWN_CYCLES


LONG = 500   # lines; a module past it says why in its docstring ("Over 500 lines ...")


def test_long_modules_say_why():
    unexplained = []
    for path in module_files().values():
        source = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(source)) or ""
        if source.count("\n") > LONG and f"Over {LONG} lines" not in doc:
            unexplained.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
    assert not unexplained, "split these, or say at the top why not:\n" + "\n".join(unexplained)
