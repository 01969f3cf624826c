"""What a `graphc build` costs before any compiling: the parser's LALR tables come with graphc
(and, for another lark, from the cache, read as literals: never unpickled, never run), and a
command of cli.py imports none of the other commands' modules."""
from __future__ import annotations

import subprocess
import sys

import lark
import pytest
from conftest import MODELS, REPO

from graphc.frontend import parser, parser_tables


@pytest.fixture
def fresh_parser(tmp_path, monkeypatch):
    """parser._parser built anew, with an empty cache folder; as it was afterwards."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    parser._parser.cache_clear()
    yield tmp_path
    parser._parser.cache_clear()


def test_the_shipped_tables_are_the_grammars():
    if lark.__version__ != parser_tables.LARK_VERSION:
        pytest.skip(f"parser_tables.py was made by lark {parser_tables.LARK_VERSION}, "
                    f"this is {lark.__version__}")
    assert parser.tables_key(parser._grammar()) == parser_tables.KEY, \
        "grammar/graphc.lark changed: run `python -m graphc.frontend.parser` to write its tables"


def test_tables_parse_as_a_freshly_built_parser(fresh_parser, monkeypatch):
    built = lark.Lark(parser._grammar(), **parser._OPTIONS)
    monkeypatch.setattr(lark.Lark, "__init__", lambda *a, **k: pytest.fail("built the tables"))
    if parser.tables_key(parser._grammar()) != parser_tables.KEY:
        pytest.skip("the shipped tables are for another lark")
    loaded = parser._parser()
    for path in MODELS:
        text = path.read_text()
        assert loaded.parse(text) == built.parse(text), path.name
    assert not list(fresh_parser.iterdir())          # nothing written to the cache


def test_other_tables_are_built_once_and_cached_as_literals(fresh_parser, monkeypatch):
    monkeypatch.setattr(parser_tables, "KEY", "made by another lark")
    text = (REPO / "models/digits_mlp.nn").read_text()
    first = parser._parser().parse(text)
    [cached] = fresh_parser.glob("parser-*.tables")
    parser._parser.cache_clear()
    monkeypatch.setattr(lark.Lark, "__init__", lambda *a, **k: pytest.fail("built the tables again"))
    assert parser._parser().parse(text) == first
    # A cache file that is code, not a literal, is never run: the tables are built again.
    monkeypatch.undo()
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(fresh_parser))
    monkeypatch.setattr(parser_tables, "KEY", "made by another lark")
    marker = fresh_parser / "ran"
    cached.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    parser._parser.cache_clear()
    assert parser._parser().parse(text) == first
    assert not marker.exists()


def test_a_build_imports_no_other_commands_modules(tmp_path):
    script = ("import sys; from graphc.cli import main; "
              f"code = main(['build', 'models/digits_logreg.nn', '-o', {str(tmp_path / 'a')!r}]); "
              "print(code, sorted(m for m in sys.modules if m.startswith('graphc.') and "
              "m.split('.')[-1] in ('search_cli', 'train_cli', 'report_cli')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={"GRAPHC_CACHE_DIR": str(tmp_path / "cache"), "PATH": ""}, check=True)
    assert done.stdout.split("\n")[-2] == "0 []"
