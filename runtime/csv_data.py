"""CSV data sets: a header row naming the columns, one sample per row, one label column. Every
problem points at its line and column, with the line and a caret."""
from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from graphc.errors import GraphcError, SourceLoc, did_you_mean, error
from graphc.files import MAX_CSV_BYTES, MAX_CSV_LINE, listing, open_regular, short

MAX_SHOWN_LINE = 500      # longer lines are not echoed in an error


def read_csv(path: Path, label: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Features (float64 [rows, columns - 1]), labels and, for string labels, the class names."""
    file = str(path)
    rows = [(no, line) for no, line in _lines(path) if line.strip()]
    if not rows:
        raise error("empty file: expected a header row naming the columns, then one row per "
                    "sample", file=path)
    head_no, head_line = rows[0]
    header = _cells(file, head_no, head_line)
    names = [cell[2] for cell in header]
    twice = {name for name, count in Counter(names).items() if count > 1}
    for col, end, cell in header:
        if not cell or cell in twice:
            problem = "empty column name" if not cell else f"column '{short(cell)}' appears twice"
            raise _cell_error(file, head_no, head_line, col, end, f"{problem} in the header")
    if label not in names:
        raise error(f"no column named '{short(label)}' (the label column); the columns are "
                    f"{listing(names)}", file=path, hint=did_you_mean(label, names[:1000]))
    if len(names) < 2:
        raise error(f"no feature columns: the only column is the label '{short(label)}'",
                    file=path)
    if len(rows) == 1:
        raise error(f"no data rows after the header (line {head_no})", file=path)
    target = names.index(label)
    x = np.empty((len(rows) - 1, len(names) - 1), dtype=np.float64)
    labels = []
    for r, (no, line) in enumerate(rows[1:]):
        cells = _cells(file, no, line)
        if len(cells) != len(names):
            col = cells[len(names)][0] if len(cells) > len(names) else len(line) + 1
            raise _cell_error(file, no, line, col, col + 1,
                              f"this row has {len(cells)} cells but the header (line {head_no}) "
                              f"names {len(names)} columns")
        features = cells[:target] + cells[target + 1:]
        for j, (col, end, cell) in enumerate(features):
            x[r, j] = _csv_number(file, no, line, col, end, cell, names[j + (j >= target)], label)
        labels.append((no, line) + cells[target])
    y, classes = _csv_labels(file, label, labels)
    return x, y, classes


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, read one at a time within the bounds: a file of at most
    MAX_CSV_BYTES, lines of at most MAX_CSV_LINE bytes, UTF-8 text without NUL characters."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_CSV_BYTES:
            raise error(f"the CSV file is {size:,} bytes, over the limit of {MAX_CSV_BYTES:,}",
                        file=path, hint="save large data sets as .npz (np.savez(path, x=x, y=y))")
        offset, no = 0, 0
        while raw := f.readline(MAX_CSV_LINE + 1):
            no += 1
            if len(raw) > MAX_CSV_LINE:
                raise error(f"line {no} is longer than {MAX_CSV_LINE:,} bytes; refused", file=path)
            if offset + len(raw) > MAX_CSV_BYTES:
                raise error(f"the CSV file grew past the limit of {MAX_CSV_BYTES:,} bytes while "
                            f"being read", file=path)
            nul = raw.find(b"\0")
            if nul >= 0:
                col = len(raw[:nul].decode("utf-8", "replace")) + 1
                raise error(f"holds a NUL character at line {no}, column {col}: a binary file, "
                            f"not CSV text", file=path)
            try:
                text = raw.decode("utf-8-sig" if no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise error(f"not UTF-8 text (byte {offset + err.start})", file=path) from None
            offset += len(raw)
            yield no, text.rstrip("\n").rstrip("\r")


def _cells(file: str, no: int, line: str) -> list[tuple[int, int, str]]:
    """(column, end column, text) of each comma-separated cell, 1-based, surrounding spaces
    trimmed; double quotes group commas and "" is a quote."""
    if '"' not in line:
        out, start = [], 0
        for part in line.split(","):
            lead = len(part) - len(part.lstrip())
            text = part.strip()
            out.append((start + lead + 1, start + lead + len(text) + 1, text))
            start += len(part) + 1
        return out
    out, buf, start, i, quoted = [], [], 0, 0, False
    while i <= len(line):
        ch = line[i] if i < len(line) else None
        if quoted:
            if ch is None:
                raise _cell_error(file, no, line, start + 1, len(line) + 1, "unterminated quote")
            if ch == '"' and line[i + 1:i + 2] == '"':
                buf.append('"')
                i += 1
            elif ch == '"':
                quoted = False
            else:
                buf.append(ch)
        elif ch == '"':
            quoted = True
        elif ch in (",", None):
            cell = "".join(buf)
            lead = len(cell) - len(cell.lstrip())
            out.append((start + lead + 1, max(i + 1, start + lead + 2), cell.strip()))
            buf, start = [], i + 1
        else:
            buf.append(ch)
        i += 1
    return out


def _cell_error(file: str, no: int, line: str, col: int, end: int, message: str,
                hint: str | None = None) -> GraphcError:
    # a very long line is not echoed: its location says where to look
    shown = line if len(line) <= MAX_SHOWN_LINE else None
    return error(message, SourceLoc(file, no, col, no, max(end, col + 1)), hint, line_text=shown)


def _csv_number(file, no, line, col, end, cell, column, label) -> float:
    try:
        value = float(cell)
    except ValueError:
        message = (f"empty cell in column '{short(column)}': expected a number" if not cell
                   else f"'{short(cell)}' in column '{short(column)}' is not a number")
        raise _cell_error(file, no, line, col, end, message,
                          f"feature columns hold numbers; only the label column ('{short(label)}') "
                          f"may hold names") from None
    if not math.isfinite(value):
        raise _cell_error(file, no, line, col, end,
                          f"'{short(cell)}' in column '{short(column)}' is not a finite number")
    return value


def _csv_labels(file: str, column: str, labels: list) -> tuple[np.ndarray, list[str] | None]:
    """Integers are class indices, other numbers regression targets, anything else class names
    (indices in sorted order)."""
    for no, line, col, end, cell in labels:
        if not cell:
            raise _cell_error(file, no, line, col, end, f"empty label in column '{short(column)}'")
    texts = [cell for *_, cell in labels]
    try:
        return np.array([int(t) for t in texts], dtype=np.int64), None
    except (ValueError, OverflowError):
        pass
    try:
        values = np.array([float(t) for t in texts], dtype=np.float64)
    except ValueError:
        classes = sorted(set(texts))
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[t] for t in texts], dtype=np.int64), classes
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        no, line, col, end, cell = labels[bad[0]]
        raise _cell_error(file, no, line, col, end,
                          f"label '{short(cell)}' is not a finite number")
    return values, None
