"""Hostile input to the front end (issue 17): every file gives a located `file:line:col` error or
is accepted, quickly, and never an internal error.

- tests/fuzz_cases/*.nn: minimized reproducers, each opening with `# expect: LINE:COL MESSAGE`
  (the first line of stderr from `graphc check`) or `# expect: ok`;
- hostile inputs too large to keep as files (a million parentheses), made here;
- a few hundred mutants of models/*.nn from tools/fuzz_frontend.py, of a fixed seed.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path

import pytest

from graphc.cli import main

REPO = Path(__file__).resolve().parent.parent
CASES = sorted((REPO / "tests" / "fuzz_cases").glob("*.nn"))
_EXPECT = re.compile(rb"^# expect: (?:ok|(\d+):(\d+) (.+))$")


def _fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_frontend",
                                                  REPO / "tools" / "fuzz_frontend.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_frontend", module)
    spec.loader.exec_module(module)
    return sys.modules["fuzz_frontend"]


def _check(path: str, capsys) -> tuple[int, str, float]:
    """Exit status, stderr and CPU seconds (wall time on a shared machine measures the others)."""
    start = time.process_time()
    code = main(["check", path])
    seconds = time.process_time() - start
    return code, capsys.readouterr().err, seconds


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module", autouse=True)
def warm():
    """Time the checks, not the first import of everything `graphc check` uses."""
    main(["check", "models/digits_mlp.nn"])


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_fuzz_case(path: Path, capsys):
    expect = _EXPECT.match(path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n", 1)[0])
    assert expect, f"{path.name} does not open with '# expect: LINE:COL MESSAGE' or '# expect: ok'"
    rel = path.relative_to(REPO).as_posix()
    code, err, seconds = _check(rel, capsys)
    assert "internal error" not in err and "Traceback" not in err, err
    assert seconds < 1.0, f"took {seconds:.2f} s"
    if expect.group(1) is None:
        assert code == 0, err
        return
    line, col, message = expect.group(1).decode(), expect.group(2).decode(), expect.group(3).decode()
    assert code == 1, err
    first = err.splitlines()[0]
    assert first.startswith(f"{rel}:{line}:{col}: error: {message}"), first
    assert re.search(r"^\s+\| +\^", err, re.M), "no caret under the source line"


# Made here, not kept: megabytes of brackets, or a thousand of something.
_PRE = "model m {\n    input x: f32[N, 4]\n    output y = "
_TRAIN = "model m {\n    input x: f32[N, 4]\n    output y = x\n    loss = mean(y)\n}\ntrain m {\n"
_DEEP = {
    "nested_calls": (_PRE + "relu(" * 350 + "x" + ")" * 350 + "\n}\n", "3:1016"),
    "long_pipeline": (_PRE + "x" + " -> relu" * 350 + "\n}\n", "3:16"),
    "long_sum": (_PRE + "x" + " + x" * 500 + "\n}\n", "3:16"),
    "leading_minus": (_PRE + "-" * 1000 + "x\n}\n", "3:873"),
    "leading_minus_300": (_PRE + "-" * 300 + "x\n}\n", "3:216"),
    "nested_train_list": (_TRAIN + "    augment = " + "[" * 1000 + "1" + "]" * 1000 + "\n}\n",
                          "7:873"),
    "million_parentheses": (_PRE + "(" * 10**6 + "x" + ")" * 10**6 + "\n}\n", "3:873"),
}


@pytest.mark.parametrize("name", sorted(_DEEP))
def test_deep_input_is_a_located_error_in_well_under_a_second(name, tmp_path, capsys):
    text, where = _DEEP[name]
    path = tmp_path / f"{name}.nn"
    path.write_text(text, encoding="utf-8")
    code, err, seconds = _check(str(path), capsys)
    assert code == 1, err
    assert err.startswith(f"{path}:{where}: error: expression nested too deeply: more than 200 "
                          f"levels"), err[:300]
    assert seconds < 1.0, f"took {seconds:.2f} s"
    assert len(err) < 2000        # the long line is shown around the caret, not whole


def test_nesting_up_to_the_limit_is_accepted(tmp_path, capsys):
    path = tmp_path / "deep.nn"
    path.write_text(_PRE + "relu(" * 199 + "x" + ")" * 199 + "\n    output z = x" +
                    " + x" * 198 + "\n}\n", encoding="utf-8")
    code, err, _ = _check(str(path), capsys)
    assert code == 0, err


# --- the fuzzer -------------------------------------------------------------------------------------

SEED, COUNT = 2026, 300


def test_mutants_of_the_models_give_located_errors_or_are_accepted(tmp_path):
    fuzz = _fuzzer()
    corpus = fuzz.load_corpus()
    verdicts, failures = {}, []
    for index in range(COUNT):
        path = tmp_path / f"m{index}.nn"
        path.write_bytes(fuzz.mutant(corpus, SEED, index))
        outcome = fuzz.check_file(str(path), hang_s=2.0, kill_s=30.0)
        verdicts[outcome.verdict] = verdicts.get(outcome.verdict, 0) + 1
        if outcome.verdict not in ("located", "accepted"):
            failures.append(f"mutant {index} (seed {SEED}): {outcome.verdict}: {outcome.detail}")
    assert not failures, "\n".join(failures)
    # The mutants reach past the parser: some are valid models, most are wrong in some way.
    assert verdicts.get("accepted", 0) >= COUNT // 50, verdicts
    assert verdicts.get("located", 0) >= COUNT // 2, verdicts


def test_mutants_are_reproducible():
    fuzz = _fuzzer()
    corpus = fuzz.load_corpus()
    first = [fuzz.mutant(corpus, 7, i) for i in range(20)]
    assert first == [fuzz.mutant(corpus, 7, i) for i in range(20)]
    assert len(set(first)) > 15


@pytest.mark.parametrize("failure, verdict", [
    (IndexError("tuple index out of range"), "internal"),
    (RecursionError("maximum recursion depth exceeded"), "internal"),
    ("unlocated", "unlocated"),
    ("slow", "hang"),
    ("waits", "hang"),
])
def test_the_fuzzer_tells_each_failure(failure, verdict, tmp_path, monkeypatch):
    """The fuzz test above can fail: each kind of failure is told for what it is."""
    import graphc.compiler
    from graphc.errors import error
    fuzz = _fuzzer()

    def broken(text, path="<string>"):
        if failure == "unlocated":
            raise error("something is wrong somewhere")
        if failure == "waits":
            time.sleep(5.0)
        if failure == "slow":
            end = time.process_time() + 0.5
            while time.process_time() < end:     # busy: a hang burns CPU time
                pass
        raise failure

    monkeypatch.setattr(graphc.compiler, "check_source", broken)
    path = tmp_path / "m.nn"
    path.write_text("model m { input x: f32[N, 4] output y = x }\n", encoding="utf-8")
    outcome = fuzz.check_file(str(path), hang_s=0.2, kill_s=0.5 if failure == "waits" else 30.0)
    assert outcome.verdict == verdict, outcome


def test_minimize_keeps_the_failure():
    fuzz = _fuzzer()
    data = b"model m {\n    input x: f32[N, 4]\n    h = relu(x)\n    output y = concat(0)\n}\n"
    small = fuzz.minimize(data, lambda d: b"concat(0)" in d)
    assert small == b"concat(0)"
