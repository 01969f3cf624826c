"""The wheel: built from a copy of the source tree, installed into a fresh virtual environment and
used from a folder outside the repository, so only what the wheel ships can be imported."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "mnist_mlp.nn"

# Never copied into the build: local environments, build outputs, caches, version control.
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", ".tox", "build", "dist", "*.egg-info",
                                 "__pycache__", ".pytest_cache", "*.pyc")

_SNIPPET = """
import sys
from pathlib import Path
import numpy as np
import graphc, graphc.runtime

repo = Path(sys.argv[1]).resolve()
for module in (graphc, graphc.runtime):
    where = Path(module.__file__).resolve()
    assert repo not in where.parents, f"{module.__name__} imported from the source tree: {where}"
    assert "site-packages" in where.parts, where

program = graphc.compile_file(sys.argv[2])
x = np.random.default_rng(0).standard_normal((3, 784)).astype(np.float32)
out = program.forward(x=x)
assert sorted(out) == ["logp"] and out["logp"].shape == (3, 10), out
assert np.allclose(np.exp(out["logp"]).sum(axis=1), 1, atol=1e-5)

loaded = graphc.runtime.load_artifact(sys.argv[3])   # built by this venv's `graphc build`
assert np.array_equal(loaded.forward(x=x)["logp"], out["logp"])
print("snippet ok")
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _run(cmd: list, cwd: Path, timeout: int = 300) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    pytest.importorskip("build", reason="the `build` package (test extra) is not installed; "
                                        "install with pip install -e '.[test]'")

    # 1. Build the wheel from a clean copy, so stale build/ folders or egg-info cannot leak in.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, src], cwd=tmp_path)
    wheels = sorted(dist.glob("graphc-*.whl"))
    assert len(wheels) == 1, wheels

    # 2. What the wheel holds.
    with zipfile.ZipFile(wheels[0]) as zf:
        names = zf.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        top = zf.read(top_level).decode().split()
        entry_points = zf.read(top_level.replace("top_level.txt", "entry_points.txt")).decode()
    assert "graphc/grammar/graphc.lark" in names
    assert "graphc/runtime/__init__.py" in names
    assert "graphc/runtime/artifact.py" in names
    assert "graphc/frontend/parser.py" in names
    for stray in ("runtime/", "grammar/", "tests/", "models/"):
        assert not [n for n in names if n.startswith(stray)], f"wheel has a top-level {stray}"
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"graphc"}, roots
    assert top == ["graphc"], top
    assert "graphc = graphc.cli:main" in entry_points

    # 3. A fresh environment with the wheel (and its dependencies from the index).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python, graphc_cmd = bindir / "python", bindir / "graphc"
    _run([python, "-m", "pip", "install", "--quiet", wheels[0]], cwd=tmp_path)

    # 4. Use it from outside the repository.
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(MODEL, work / "model.nn")
    out = _run([graphc_cmd, "--version"], cwd=work)
    assert "graphc" in out
    out = _run([graphc_cmd, "check", "model.nn"], cwd=work)
    assert "mnist_mlp" in out and "ok" in out
    out = _run([graphc_cmd, "build", "model.nn", "-o", "art"], cwd=work)
    assert "built mnist_mlp" in out
    assert sorted(p.name for p in (work / "art").iterdir()) == \
        ["graph.json", "manifest.json", "params.npz"]
    out = _run([python, "-c", _SNIPPET, ROOT, "model.nn", "art"], cwd=work)
    assert "snippet ok" in out


def test_install_hints_name_the_clone_not_the_public_index():
    """A package named graphc on the public index is someone else's: every hint installs an extra
    from the clone (`pip install -e '.[EXTRA]'`), and each extra it names exists."""
    import re
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set()
    for path in sorted([*ROOT.glob("graphc/**/*.py"), *ROOT.glob("runtime/**/*.py"),
                        *ROOT.glob("docs/*.md"), ROOT / "README.md"]):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"pip install ['\"]?graphc\b", text), path
        named |= set(re.findall(r"pip install -e '\.\[([a-z,]+)\]'", text))
    assert named, "no install hint found"
    for group in named:
        assert set(group.split(",")) <= set(extras), group
    assert {"digits", "search", "report"} <= {e for dep in extras["all"]
                                              for e in re.findall(r"\[(.*)\]", dep)[0].split(",")}
