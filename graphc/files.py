"""Files in and out. Reading files graphc did not necessarily write: regular files only, of
bounded size; JSON of bounded nesting, checked against a schema; and only the named members of an
.npz archive, their declared sizes checked before anything is allocated or decompressed. Every
problem is a `GraphcError` naming the file. Writing: `atomic_write`, so that a crash leaves the
old file or the new one (the front end's parser tables, the backends' kernel caches and the
runtime's artifacts, checkpoints and run folders all write through it)."""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from graphc.errors import GraphcError, error

MiB, GiB = 1 << 20, 1 << 30
MAX_JSON_BYTES = 64 * MiB       # graph.json, manifest.json, config.json; a loop state as stored (4 B a char)
MAX_JSON_DEPTH = 100            # nesting of JSON arrays and objects
MAX_DATA_BYTES = 4 * GiB        # one data array: an IDX file decompressed, an .npz member
MAX_CSV_BYTES = 256 * MiB       # a CSV data set (parsed in Python: several times its size in memory)
MAX_CSV_LINE = 16 * MiB         # one row of a CSV data set
MAX_SOURCE = 1 * MiB            # a .nn file read again for the source line under an error's caret
NPY_HEADER_BYTES = 10_000       # numpy's own bound on an .npy header
_CHUNK = 16 * MiB

# Names from files (parameters, inputs, outputs) may become zip member names or parts of paths:
# no separators, no control characters, no "." or "..".
_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,200}")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")


def is_safe_name(name) -> bool:
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and name not in (".", "..")


def is_identifier(name) -> bool:
    return isinstance(name, str) and bool(IDENTIFIER.fullmatch(name))


def short(text: str, limit: int = 60) -> str:
    """`text` cut to about `limit` characters, for echoing a value from a file in a message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def listing(names: list[str], limit: int = 20) -> str:
    """Names for a message, comma-separated: the first `limit`, each cut short, and a count."""
    shown = ", ".join(short(n, 40) for n in names[:limit])
    return shown + (f" and {len(names) - limit:,} more" if len(names) > limit else "")


def open_regular(path: Path):
    """A binary file object for `path`, which must be (or link to) a regular file: never a device,
    a FIFO (opened without blocking, so a FIFO cannot hang the open) or a folder."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error("no such file", file=path) from None
    except OSError as err:
        raise error(f"cannot read: {err.strerror}", file=path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error("not a regular file (a device, a FIFO or a folder); refused", file=path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, limit: int, what: str = "the file") -> bytes:
    """The contents of the regular file `path`, refused when longer than `limit` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{what} is {size:,} bytes, over the limit of {limit:,}", file=path)
        data = f.read(size + 1)
        if len(data) > size:        # it grew after fstat: read on, as far as the limit
            data += f.read(limit + 1 - len(data))
    if len(data) > limit:
        raise error(f"{what} grew past the limit of {limit:,} bytes while being read", file=path)
    return data


def source_line(loc) -> str | None:
    """The line of its .nn file a SourceLoc points into, for an error's caret; None when the file
    is gone, not a regular file (a FIFO, a device), over MAX_SOURCE bytes or unreadable. The
    location may come from a loaded artifact or run, so the path is never trusted further."""
    if loc is None:
        return None
    try:
        text = read_bytes(Path(loc.file), MAX_SOURCE).decode("utf-8", errors="replace")
    except (GraphcError, OSError, ValueError):
        return None
    lines = text.splitlines()
    return lines[loc.line - 1] if 1 <= loc.line <= len(lines) else None


def parse_json(data: bytes | str, path: Path, depth: int = MAX_JSON_DEPTH):
    """Parse JSON text, refusing nesting deeper than `depth`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as err:
        raise error(f"not valid JSON (not UTF-8 at byte {err.start})", file=path) from None
    too_deep = error(f"refused: JSON nested deeper than {depth} levels", file=path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"not valid JSON ({err})", file=path) from None
    except RecursionError:   # the C parser's own bound, reached before the text's end
        raise too_deep from None
    if _deeper_than(value, depth):
        raise too_deep
    return value


def _deeper_than(value, limit: int) -> bool:
    """Whether lists and objects nest deeper than `limit`, found without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def load_json(path: Path, limit: int = MAX_JSON_BYTES):
    return parse_json(read_bytes(path, limit, "the JSON file"), path)


# --- schemas ----------------------------------------------------------------------------------------

class MapOf:
    """A JSON object with any keys, each value matching `spec`."""

    def __init__(self, spec):
        self.spec = spec


class ListOf:
    """A JSON list, each item matching `spec`."""

    def __init__(self, spec):
        self.spec = spec


ANY = object()
CALL = object()     # a call in a train block: [name, {options}]
_KIND = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
         bool: "true or false", type(None): "null"}


def check_schema(value, spec, path: Path, where: str = "") -> None:
    """Check parsed JSON against `spec`: a type or tuple of types (int is not bool; float takes
    int), a dict of keys (a key ending in "?" may be left out; a key "*" gives the spec of any
    other key, which is refused without it), MapOf, ListOf, CALL or ANY. A mismatch is an error
    naming the file and the place in it."""
    at = where or "the top level"
    if spec is ANY:
        return
    if spec is CALL:
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], dict)):
            raise error(f"{at} should be [name, {{options}}]", file=path)
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise _mismatch(path, at, "an object", value)
        keys = {k.rstrip("?"): k for k in spec if k != "*"}
        for key in value:
            if key in keys:
                continue
            if "*" not in spec:
                raise error(f"unknown key {short(key)!r} in {at}", file=path)
            check_schema(value[key], spec["*"], path, _member(where, short(key, 40)))
        for key, raw in keys.items():
            if key in value:
                check_schema(value[key], spec[raw], path, _member(where, key))
            elif not raw.endswith("?"):
                raise error(f"{at} lacks the key {key!r}", file=path)
        return
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise _mismatch(path, at, "an object", value)
        for key, item in value.items():
            check_schema(item, spec.spec, path, _member(where, short(key, 40)))
        return
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise _mismatch(path, at, "a list", value)
        for i, item in enumerate(value):
            check_schema(item, spec.spec, path, f"{where}[{i}]")
        return
    if isinstance(spec, tuple):     # alternatives: the first whose kind fits decides
        for alt in spec:
            if _fits(value, alt):
                return check_schema(value, alt, path, where)
        raise _mismatch(path, at, " or ".join(_kind(alt) for alt in spec), value)
    if not _fits(value, spec):
        raise _mismatch(path, at, _kind(spec), value)


def _member(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _fits(value, spec) -> bool:
    """Whether `value` is of the kind `spec` asks for (its contents are checked separately)."""
    if spec is ANY:
        return True
    if spec is CALL:
        return isinstance(value, list)
    t = dict if isinstance(spec, (dict, MapOf)) else list if isinstance(spec, ListOf) else spec
    if isinstance(value, bool):
        return t is bool
    return isinstance(value, t) or (t is float and isinstance(value, int))


def _kind(spec) -> str:
    if spec is CALL:
        return "[name, {options}]"
    t = dict if isinstance(spec, (dict, MapOf)) else list if isinstance(spec, ListOf) else spec
    return _KIND.get(t, getattr(t, "__name__", "?"))


def _mismatch(path: Path, at: str, want: str, value):
    found = _KIND.get(type(value), type(value).__name__)
    return error(f"{at} should be {want}, found {found}", file=path)


# --- .npz archives ----------------------------------------------------------------------------------

_DAMAGED = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error,
            NotImplementedError, RuntimeError, struct.error)
_PICKLE_HINT = "save plain numeric arrays, e.g. np.savez(path, x=x.astype(np.float32))"


class Npz:
    """An .npz archive (a file object or a path) from which only named members are read. Each
    member's .npy header is checked (no objects, no pickles, a size it can hold and under `limit`)
    before its data is decompressed into an array of exactly that size."""

    def __init__(self, source, path: Path, max_bytes: int | None = None, what: str = "the file"):
        self.path = Path(path)
        self._file = open_regular(path) if source is None else source
        size = self._file.seek(0, os.SEEK_END)
        self._file.seek(0)
        if max_bytes is not None and size > max_bytes:
            self._file.close()
            raise error(f"{what} is {size:,} bytes, over the limit of {max_bytes:,}", file=path)
        try:
            self.zip = zipfile.ZipFile(self._file)
        except _DAMAGED as err:
            self.close()
            raise error(f"not a readable .npz archive ({err})", file=self.path) from None
        self.members = {info.filename[:-4]: info for info in self.zip.infolist()
                        if info.filename.endswith(".npy")}

    @property
    def names(self) -> list[str]:
        return list(self.members)

    def close(self) -> None:
        if hasattr(self, "zip"):
            self.zip.close()
        self._file.close()

    def __enter__(self) -> Npz:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, name: str, limit: int, dtype=None, shape=None, what: str | None = None) -> np.ndarray:
        """Member `name` as an array; with `dtype` and `shape`, it must be exactly that."""
        what = what or f"array '{name}'"
        info = self.members.get(name)
        if info is None:
            raise error(f"{what} is missing", file=self.path)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise error(f"{what} uses an unsupported compression method", file=self.path)
        if info.file_size > limit + NPY_HEADER_BYTES + 128:
            raise error(f"{what} is {info.file_size:,} bytes, over the limit of {limit:,}",
                        file=self.path)
        try:
            with self.zip.open(info) as member:
                found, fortran, found_shape = _npy_header(member, self.path, what)
                nbytes = math.prod(found_shape) * found.itemsize
                if nbytes > limit:
                    raise error(f"{what} is {found}{list(found_shape)} ({nbytes:,} bytes), over "
                                f"the limit of {limit:,}", file=self.path)
                if nbytes != info.file_size - member.tell():
                    raise error(f"{what}: its header says {nbytes:,} bytes of data, the archive "
                                f"holds {info.file_size - member.tell():,}", file=self.path)
                if dtype is not None and (found != dtype or found_shape != tuple(shape)):
                    raise error(f"{what} should be {np.dtype(dtype)}{list(shape)}, found "
                                f"{found}{list(found_shape)}", file=self.path)
                array = np.empty(found_shape, found, order="F" if fortran else "C")
                _read_into(member, array, self.path, what)
        except _DAMAGED as err:
            raise error(f"{what} is damaged ({err})", file=self.path) from None
        return array


def read_npy(path: Path, limit: int, what: str = "the array") -> np.ndarray:
    """One .npy file, its header checked against `limit` and against the file's size before the
    data is read (never unpickled)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        dtype, fortran, shape = _npy_header(f, Path(path), what)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > limit:
            raise error(f"{what} is {dtype}{list(shape)} ({nbytes:,} bytes), over the limit of "
                        f"{limit:,}", file=path)
        if nbytes != size - f.tell():
            raise error(f"{what}: its header says {nbytes:,} bytes of data, the file holds "
                        f"{size - f.tell():,}", file=path)
        array = np.empty(shape, dtype, order="F" if fortran else "C")
        _read_into(f, array, Path(path), what)
    return array


def _npy_header(member, path: Path, what: str) -> tuple[np.dtype, bool, tuple[int, ...]]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(member, NPY_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(member, NPY_HEADER_BYTES)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except (ValueError, EOFError, SyntaxError, TypeError) as err:
        raise error(f"{what} is not a readable .npy array ({err})", file=path) from None
    if dtype.hasobject:
        raise error(f"{what} holds Python objects (dtype object); reading it would unpickle "
                    f"them, which can run arbitrary code, so graphc refuses", file=path,
                    hint=_PICKLE_HINT)
    if dtype.kind not in "biufcUSV?" or dtype.names is not None or dtype.subdtype is not None:
        raise error(f"{what} has dtype {dtype}, which graphc does not read", file=path)
    return dtype, bool(fortran), tuple(int(d) for d in shape)


def _read_into(member, array: np.ndarray, path: Path, what: str) -> None:
    view = memoryview(array.reshape(-1, order="A").view(np.uint8)) if array.size else memoryview(b"")
    at = 0
    while at < len(view):
        chunk = member.read(min(_CHUNK, len(view) - at))
        if not chunk:
            raise error(f"{what} is truncated", file=path)
        view[at:at + len(chunk)] = chunk
        at += len(chunk)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600; a saved file should not be private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file (metrics, norms, search results), none when it is
    missing; a line cut short by a crash, or one that is not an object, is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in read_bytes(path, MAX_JSON_BYTES).decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
