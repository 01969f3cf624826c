"""Parsing: the lark grammar (shipped as package data) and the translation of lark's errors into
graphc's own, with an 'expected ...' list in the language's words and a caret under the column."""
from __future__ import annotations

import functools
from importlib import resources

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from graphc.errors import GraphcError, SourceLoc, SourceText
from graphc.frontend import ast
from graphc.frontend.transform import ToAst

# How the parser's terminals read in a message.
_WORDS = {"NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
          "COMPARE_OP": "a comparison", "$END": "the end of the file"}


@functools.cache
def _parser() -> lark.Lark:
    text = resources.files("graphc.grammar").joinpath("graphc.lark").read_text(encoding="utf-8")
    return lark.Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _describe(parser: lark.Lark, terminal: str) -> str:
    if terminal in _WORDS:
        return _WORDS[terminal]
    try:
        pattern = parser.get_terminal(terminal).pattern
    except KeyError:
        return terminal.lower()
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"'{pattern.value}'"
    return terminal.lower()


def _expected(parser: lark.Lark, names) -> str:
    words = sorted({_describe(parser, n) for n in names},
                   key=lambda w: (not w.startswith("'"), w))
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _token_text(tok) -> str:
    if tok.type == "$END":
        return "the end of the file"
    return f"'{tok}'"


def _parse_error(src: SourceText, err: UnexpectedInput) -> GraphcError:
    parser = _parser()
    line, col = getattr(err, "line", None), getattr(err, "column", None)
    if isinstance(err, UnexpectedCharacters):
        char = src.text[err.pos_in_stream] if err.pos_in_stream < len(src.text) else "?"
        loc = SourceLoc(src.path, line, col)
        return src.error(f"unexpected character '{char}'", loc,
                         hint=f"expected {_expected(parser, err.allowed)}" if err.allowed else None)
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken)
                                          and err.token.type == "$END"):
        last = max(len(src.lines), 1)
        loc = SourceLoc(src.path, last, len(src.line(last) or "") + 1)
        expected = getattr(err, "expected", None) or []
        return src.error("unexpected end of file" + (f": expected {_expected(parser, expected)}"
                                                       if expected else ""), loc,
                         hint="a '{' is not closed" if "RBRACE" in expected else None)
    assert isinstance(err, UnexpectedToken), f"internal error: unknown parse error {err!r}"
    tok = err.token
    loc = SourceLoc(src.path, tok.line, tok.column, tok.end_line, tok.end_column)
    return src.error(f"unexpected {_token_text(tok)}: expected {_expected(parser, err.expected)}",
                     loc)


def parse(text: str, path: str = "<string>") -> ast.Module:
    src = SourceText(path, text)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as err:
        raise _parse_error(src, err) from None
    return ToAst(path).module(tree)
