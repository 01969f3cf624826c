"""Where graphc keeps what it can rebuild: parser tables, compiled kernels, built artifacts.

$GRAPHC_CACHE_DIR when set, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache) /graphc.
Everything here is derived from graphc itself, keyed by content hashes; deleting it is always safe.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("GRAPHC_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphc"
