"""Golden tests for user-facing error messages.

Each tests/errors/NAME.nn holds one user mistake; tests/errors/NAME.txt holds the exact stderr of
`graphc check tests/errors/NAME.nn` run from the repository root. Every mistake must exit with
status 1 and a `file:line:col: error: ...` report, never a traceback or an internal error.

After a deliberate change to a message, rewrite the goldens and review the diff:

    GRAPHC_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_errors_golden.py
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from graphc.cli import main

REPO = Path(__file__).resolve().parent.parent
ERRORS = REPO / "tests" / "errors"
CASES = sorted(ERRORS.glob("*.nn"))
UPDATE = os.environ.get("GRAPHC_UPDATE_GOLDEN") == "1"
FIRST_LINE = re.compile(r"^tests/errors/[\w.]+\.nn:\d+:\d+: error: ")

# Files whose current output is a graphc bug (not a user-facing error). Strict: once fixed, the
# test passes, the xfail turns into a failure, and the entry must go (then regenerate the golden).
KNOWN_BUGS: dict[str, str] = {}   # stem -> reason: a case whose golden pins a known bug


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _check(path: Path, capsys) -> tuple[int, str, str]:
    code = main(["check", _rel(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _case_params():
    for path in CASES:
        marks = []
        if path.stem in KNOWN_BUGS:
            marks.append(pytest.mark.xfail(reason=KNOWN_BUGS[path.stem], strict=not UPDATE))
        yield pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", list(_case_params()))
def test_error_golden(path: Path, capsys):
    code, out, err = _check(path, capsys)
    golden = path.with_suffix(".txt")
    if UPDATE:
        golden.write_text(err, encoding="utf-8")
    assert "Traceback" not in err
    assert "internal error" not in err
    assert code == 1, f"exit status {code}\n{err}"
    assert out == ""
    assert golden.exists(), f"no golden {_rel(golden)}: run with GRAPHC_UPDATE_GOLDEN=1"
    assert err == golden.read_text(encoding="utf-8")


def test_every_case_has_a_golden_and_vice_versa():
    goldens = sorted(ERRORS.glob("*.txt"))
    assert {p.stem for p in goldens} == {p.stem for p in CASES}
    assert len(goldens) >= 20


@pytest.mark.parametrize("golden", sorted(ERRORS.glob("*.txt")), ids=lambda p: p.stem)
def test_golden_starts_with_file_line_col(golden: Path):
    if golden.stem in KNOWN_BUGS:
        pytest.xfail(KNOWN_BUGS[golden.stem])
    first = golden.read_text(encoding="utf-8").splitlines()[0]
    assert FIRST_LINE.match(first), first


def test_goldens_are_distinct():
    texts = [p.read_text(encoding="utf-8") for p in sorted(ERRORS.glob("*.txt"))]
    assert len(set(texts)) == len(texts)


def test_multiple_errors_are_all_reported():
    text = (ERRORS / "two_errors.txt").read_text(encoding="utf-8")
    assert len(re.findall(r"^tests/errors/two_errors\.nn:\d+:\d+: error: ", text, re.M)) >= 2


def test_real_entry_point_exits_1_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "graphc", "check", "tests/errors/matmul_inner_mismatch.nn"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr == (ERRORS / "matmul_inner_mismatch.txt").read_text(encoding="utf-8")
