"""User-facing diagnostics: source locations, errors with `file:line:col`, the source line and a caret.

Everything a user can get wrong ends up as a `GraphcError` holding one or more `Diagnostic`s;
internal invariants are plain assertions that say "internal error".
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SourceLoc:
    """A span in a source file (1-based lines and columns, end exclusive)."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def to_json(self) -> list:
        return [self.file, self.line, self.col, self.end_line, self.end_col]

    @classmethod
    def from_json(cls, data) -> SourceLoc | None:
        if data is None:
            return None
        file, line, col, end_line, end_col = data
        return cls(str(file), int(line), int(col),
                   None if end_line is None else int(end_line),
                   None if end_col is None else int(end_col))


@dataclass(frozen=True)
class Diagnostic:
    message: str
    loc: SourceLoc | None = None
    hint: str | None = None
    severity: str = "error"
    line_text: str | None = None   # the source line the location points into
    file: str | None = None        # for problems with a whole file (no line to point at)

    def render(self) -> str:
        where = f"{self.loc}: " if self.loc else f"{self.file}: " if self.file else ""
        out = [f"{where}{self.severity}: {self.message}"]
        if self.loc and self.line_text is not None:
            out.extend(_caret_lines(self.loc, self.line_text))
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)


def _caret_lines(loc: SourceLoc, raw: str) -> list[str]:
    raw = raw.rstrip("\n")
    text = raw.expandtabs(4)    # columns count characters; the caret must count display cells
    gutter = f"{loc.line:>4} | "
    start = len(raw[:max(loc.col - 1, 0)].expandtabs(4))
    if loc.end_line == loc.line and loc.end_col and loc.end_col > loc.col:
        width = len(raw[:loc.end_col - 1].expandtabs(4)) - start
    else:
        width = 1
    width = max(1, min(width, max(len(text) - start, 1)))
    if len(text) > _SHOWN:      # a long line: the part around the caret, not megabytes of it
        lo = max(0, min(start - _SHOWN // 2, len(text) - _SHOWN))
        head, tail = ("..." if lo else ""), ("..." if lo + _SHOWN < len(text) else "")
        text = head + text[lo:lo + _SHOWN] + tail
        start = start - lo + len(head)
        width = max(1, min(width, _SHOWN - (start - len(head))))
    marker = " " * start + "^" + "~" * (width - 1)
    return [gutter + text, " " * (len(gutter) - 2) + "| " + marker]


_SHOWN = 120    # display cells of a source line shown under a message


class GraphcError(Exception):
    """One or more user-facing errors; `str()` is the full rendered report."""

    def __init__(self, diagnostics: Diagnostic | Iterable[Diagnostic]):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        assert self.diagnostics, "internal error: GraphcError without diagnostics"
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


class ProgramError(ValueError):
    """A mistake in how a program is called from Python (wrong input, wrong parameter value)."""


def error(message: str, loc: SourceLoc | None = None, hint: str | None = None,
          line_text: str | None = None, file: str | None = None) -> GraphcError:
    return GraphcError(Diagnostic(message, loc, hint, "error", line_text, str(file) if file else None))


def _one_edit_apart(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `name`, for 'did you mean' hints."""
    pool = sorted(set(candidates))
    same_but_case = [c for c in pool if c.lower() == name.lower() and c != name]
    if same_but_case:
        return same_but_case[0]
    matches = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    if matches:
        return matches[0]
    near = [c for c in pool if _one_edit_apart(name, c)]   # short names: W2 -> W1
    return near[0] if near else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    best = closest(name, candidates)
    return f"did you mean '{best}'?" if best else None


@dataclass
class SourceText:
    """A source file's text, for looking up the line a location points into."""

    path: str
    text: str
    lines: list[str] = field(init=False)

    def __post_init__(self):
        self.lines = self.text.splitlines()

    def line(self, n: int) -> str | None:
        return self.lines[n - 1] if 1 <= n <= len(self.lines) else None

    def snippet(self, loc: SourceLoc) -> str:
        """The source text a (single- or multi-line) span covers, whitespace collapsed."""
        if loc.end_line is None or loc.end_col is None:
            return ""
        rows = self.lines[loc.line - 1:loc.end_line]
        if not rows:
            return ""
        if len(rows) == 1:
            return rows[0][loc.col - 1:loc.end_col - 1]
        rows[0] = rows[0][loc.col - 1:]
        rows[-1] = rows[-1][:loc.end_col - 1]
        return " ".join(r.strip() for r in rows)

    def diagnostic(self, message: str, loc: SourceLoc | None, hint: str | None = None,
                   severity: str = "error") -> Diagnostic:
        text = self.line(loc.line) if loc else None
        return Diagnostic(message, loc, hint, severity, text)

    def error(self, message: str, loc: SourceLoc | None, hint: str | None = None) -> GraphcError:
        return GraphcError(self.diagnostic(message, loc, hint))
