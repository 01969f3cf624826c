"""Parsing: the lark grammar (shipped as package data) and the translation of lark's errors into
graphc's own, with an 'expected ...' list in the language's words and a caret under the column."""
from __future__ import annotations

import ast as literals
import functools
import hashlib
import sys
from importlib import resources
from pathlib import Path

import lark
from lark import Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from graphc.cache import cache_dir
from graphc.errors import GraphcError, SourceLoc, SourceText, did_you_mean
from graphc.files import atomic_write
from graphc.frontend import ast
from graphc.frontend.limits import MAX_NESTING, MAX_PARSE_STACK
from graphc.frontend.transform import EXPRESSION_RULES, ToAst

# How the parser's terminals read in a message.
_WORDS = {"NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
          "COMPARE_OP": "a comparison", "$END": "the end of the file"}
_OPTIONS = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True}
TABLES_MODULE = Path(__file__).with_name("parser_tables.py")


def _grammar() -> str:
    return resources.files("graphc.grammar").joinpath("graphc.lark").read_text(encoding="utf-8")


def tables_key(grammar: str) -> str:
    """What the LALR tables are made from: the grammar, the options and lark's version."""
    text = f"{lark.__version__}\0{sorted(_OPTIONS.items())}\0{grammar}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@functools.cache
def _parser() -> lark.Lark:
    """The parser. Building its LALR tables costs a fifth of a second, more than the rest of a
    small build, so they come with graphc: parser_tables.py, Python literals that load in a few
    ms. With another lark (or an edited grammar) they are built, and kept in the user's graphc
    cache folder as literals too. Tables are read with `ast.literal_eval`, never pickle: nothing
    read from a cache can run as code."""
    grammar = _grammar()
    key = tables_key(grammar)
    from graphc.frontend import parser_tables
    if key == parser_tables.KEY:
        tables = parser_tables.TABLES
    else:
        tables = _cached_tables(cache_dir() / f"parser-{key}.tables")
    if tables is not None:
        try:
            return lark.Lark._load_from_dict(tables["data"], tables["memo"])
        except Exception:   # tables lark cannot read back: build them again
            pass
    parser = lark.Lark(grammar, **_OPTIONS)
    try:
        path = cache_dir() / f"parser-{key}.tables"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, _tables_literal(parser).encode())
    except OSError:
        pass
    return parser


def _cached_tables(path: Path) -> dict | None:
    try:
        return literals.literal_eval(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _tables_literal(parser: lark.Lark) -> str:
    """The parser's tables as a Python literal (lark's own serialization: dicts, lists, strings,
    numbers)."""
    data, memo = parser.memo_serialize([lark.lexer.TerminalDef, lark.grammar.Rule])
    return repr({"data": data, "memo": memo})


def write_tables_module(path: Path = TABLES_MODULE) -> None:
    """Write parser_tables.py for the grammar and the installed lark (run after editing the
    grammar: `python -m graphc.frontend.parser`). lark numbers its states in an order that
    string hashing sways, so two runs may write different, equivalent tables."""
    grammar = _grammar()
    parser = lark.Lark(grammar, **_OPTIONS)
    path.write_text(
        f'''"""The LALR tables of grammar/graphc.lark, made by lark {lark.__version__}: written by
`python -m graphc.frontend.parser` (do not edit), read by parser.py when KEY is the tables_key of
the grammar and the installed lark."""
# ruff: noqa: E501

KEY = "{tables_key(grammar)}"
LARK_VERSION = "{lark.__version__}"
TABLES = {_tables_literal(parser)}
''', encoding="utf-8")


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
        shown = f"'{char}'" if char.isprintable() else f"U+{ord(char):04X}"   # a NUL, a BOM
        return src.error(f"unexpected character {shown}", loc,
                         f"{shown} is not part of the .nn language")
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


def _too_deep(src: SourceText, loc: SourceLoc) -> GraphcError:
    return src.error(f"expression nested too deeply: more than {MAX_NESTING} levels", loc,
                     "name intermediate results (`h = ...`) to flatten it")


def _parse_tree(src: SourceText) -> Tree:
    """lark's LALR parse, fed token by token so that nesting past MAX_PARSE_STACK stops at the
    token that passes it (a million parentheses would otherwise take half a minute)."""
    interactive = _parser().parse_interactive(src.text)
    stack = interactive.parser_state.state_stack
    token = None
    for token in interactive.iter_parse():
        if len(stack) > MAX_PARSE_STACK:
            raise _too_deep(src, SourceLoc(src.path, token.line, token.column))
    return interactive.feed_eof(token)


def _check_nesting(src: SourceText, tree: Tree) -> None:
    """Refuse expressions nested past MAX_NESTING before anything recurses over them. Chains
    of left-associative operators (`a + b + c`, `x -> f -> g`) nest one level per operator
    without growing the parser's stack, so the tree itself is measured (without recursion)."""
    pending = [(tree, 0)]
    while pending:
        node, depth = pending.pop()
        if node.data in EXPRESSION_RULES:
            depth += 1
            if depth > MAX_NESTING:
                m = node.meta
                raise _too_deep(src, SourceLoc(src.path, m.line, m.column, m.end_line,
                                               m.end_column))
        # Leftmost first: the caret goes to the first place the limit is passed.
        pending.extend((child, depth) for child in reversed(node.children)
                       if isinstance(child, Tree))


def parse(text: str, path: str = "<string>") -> ast.Module:
    src = SourceText(path, text)
    try:
        tree = _parse_tree(src)
    except UnexpectedInput as err:
        raise _parse_error(src, err) from None
    _check_nesting(src, tree)
    return ToAst(src).module(tree)


if __name__ == "__main__":
    write_tables_module()
    print(f"wrote {TABLES_MODULE}", file=sys.stderr)
