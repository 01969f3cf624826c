"""Parsing: the lark grammar (shipped as package data) and the translation of lark's errors into
graphc's own, with an 'expected ...' list in the language's words and a caret under the column."""
from __future__ import annotations

import functools
import hashlib
import io
from importlib import resources

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from graphc.cache import cache_dir
from graphc.errors import GraphcError, SourceLoc, SourceText, did_you_mean
from graphc.frontend import ast
from graphc.frontend.transform import ToAst
from graphc.runtime.artifact import atomic_write

# How the parser's terminals read in a message.
_WORDS = {"NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
          "COMPARE_OP": "a comparison", "$END": "the end of the file"}


@functools.cache
def _parser() -> lark.Lark:
    text = resources.files("graphc.grammar").joinpath("graphc.lark").read_text(encoding="utf-8")
    options = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True}
    # Building the LALR tables takes a fifth of a second, so they are kept in the user's own
    # graphc cache folder (never a shared temp folder: lark reads them back with pickle), in a
    # file named by a hash of the grammar, the options and lark's version, written atomically.
    key = hashlib.sha256(f"{lark.__version__}\0{sorted(options.items())}\0{text}".encode()).hexdigest()
    path = cache_dir() / f"parser-{key[:24]}.lark"
    try:
        with open(path, "rb") as fh:
            return lark.Lark.load(fh)
    except Exception:   # missing, unreadable or from another lark: build the tables again
        pass
    parser = lark.Lark(text, **options)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tables = io.BytesIO()
        parser.save(tables)
        atomic_write(path, tables.getvalue())
    except OSError:
        pass
    return parser


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


# Terminals that can start an expression: when most of them are expected, say "an expression".
_EXPR_START = {"NAME", "NUMBER", "STRING", "LPAR", "LSQB", "MINUS", "PLUS", "TRUE", "FALSE"}


def _expected(parser: lark.Lark, names) -> str:
    names = set(names)
    collapsed = len(names & _EXPR_START) >= 4
    if collapsed:
        names -= _EXPR_START
    words = sorted({_describe(parser, n) for n in names},
                   key=lambda w: (not w.startswith("'"), w))
    if collapsed:
        words.insert(0, "an expression")
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _token_text(tok) -> str:
    if tok.type == "$END":
        return "the end of the file"
    return f"'{tok}'"


_KEYWORDS = ("model", "train", "search", "def", "input", "param", "output")
_CLOSERS = {"(": ")", "[": "]", "{": "}"}


def _unclosed(text: str, upto: int) -> tuple[str, int] | None:
    """The innermost bracket opened before offset `upto` and not closed by then."""
    stack: list[tuple[str, int]] = []
    i = 0
    while i < min(upto, len(text)):
        c = text[i]
        if c == "#":
            nl = text.find("\n", i)
            i = len(text) if nl < 0 else nl
            continue
        if c == '"':
            end = text.find('"', i + 1)
            i = len(text) if end < 0 else end + 1
            continue
        if c in _CLOSERS:
            stack.append((c, i))
        elif stack and c == _CLOSERS[stack[-1][0]]:
            stack.pop()
        i += 1
    return stack[-1] if stack else None


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _unclosed_hint(src: SourceText, upto: int, expected) -> str | None:
    found = _unclosed(src.text, upto)
    if found is None:
        return None
    bracket, offset = found
    closer = {"(": "RPAR", "[": "RSQB", "{": "RBRACE"}[bracket]
    if expected is not None and closer not in expected:
        return None
    line, col = _position(src.text, offset)
    return f"the '{bracket}' at line {line}, column {col} is not closed"


def _previous_word(text: str, offset: int) -> str:
    head = text[:offset].rstrip()
    i = len(head)
    while i and (head[i - 1].isalnum() or head[i - 1] == "_"):
        i -= 1
    return head[i:]


def _parse_error(src: SourceText, err: UnexpectedInput) -> GraphcError:
    parser = _parser()
    line, col = getattr(err, "line", None), getattr(err, "column", None)
    if isinstance(err, UnexpectedCharacters):
        char = src.text[err.pos_in_stream] if err.pos_in_stream < len(src.text) else "?"
        loc = SourceLoc(src.path, line, col)
        if char == '"':
            return src.error("unterminated string", loc,
                             "a string must end with '\"' on the same line")
        if char == "'":
            return src.error("unexpected character \"'\"", loc,
                             'strings use double quotes: "data.npz"')
        return src.error(f"unexpected character '{char}'", loc,
                         f"'{char}' is not part of the .nn language")
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken)
                                          and err.token.type == "$END"):
        last = max(len(src.lines), 1)
        loc = SourceLoc(src.path, last, len(src.line(last) or "") + 1)
        expected = getattr(err, "expected", None) or []
        hint = _unclosed_hint(src, len(src.text), None)
        if hint:    # the unclosed bracket is the news; what else could follow is noise
            return src.error("unexpected end of file", loc, hint)
        return src.error("unexpected end of file" + (f": expected {_expected(parser, expected)}"
                                                       if expected else ""), loc)
    assert isinstance(err, UnexpectedToken), f"internal error: unknown parse error {err!r}"
    tok = err.token
    loc = SourceLoc(src.path, tok.line, tok.column, tok.end_line, tok.end_column)
    if tok.type == "COMPARE_OP" and any(c in _previous_text(src, tok) for c in "<>="):
        return src.error(f"comparisons cannot be chained: '{tok}' follows a comparison", loc,
                         "combine two comparisons with where(...), or compare once")
    hint = _unclosed_hint(src, tok.start_pos, err.expected)
    if hint is None and tok.type == "NAME":      # `modle m {`: the misspelt keyword itself
        hint = did_you_mean(str(tok), [k for k in _KEYWORDS if k.upper() in err.expected])
    word = _previous_word(src.text, tok.start_pos)
    if hint is None and word and word not in _KEYWORDS:   # `inputs x: ...`
        hint = did_you_mean(word, _KEYWORDS)
    return src.error(f"unexpected {_token_text(tok)}: expected {_expected(parser, err.expected)}",
                     loc, hint)


def _previous_text(src: SourceText, tok) -> str:
    """The statement text before `tok` on its line."""
    line = src.line(tok.line) or ""
    return line[:tok.column - 1].split(";")[-1].split("=", 1)[-1]


def parse(text: str, path: str = "<string>") -> ast.Module:
    src = SourceText(path, text)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as err:
        raise _parse_error(src, err) from None
    return ToAst(path).module(tree)
