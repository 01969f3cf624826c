"""Files written so that a crash leaves the old one or the new one, and JSON-lines read back.

Core helpers: the front end (parser tables), the backends (kernel caches) and the runtime
(artifacts, checkpoints, run folders) all write through `atomic_write`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


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
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
