"""Incremental `graphc build`: an artifact built before from the same source, options and graphc
is copied from the cache instead of compiled again, without importing the compiler or numpy.

The key hashes the .nn text and its path (and, where it uses the npz initializer, the .npz
archives beside it), every build option that changes what is built or whether
the build is allowed (`BUILD_OPTIONS`: model, seed, backend, precision, --Werror), the source
of graphc itself (every .py and .lark file of the installed package, so an edited compiler never
reuses old artifacts) and, for compiled backends, what their kernel cache is keyed by (the CPU,
llvmlite's version). An entry is a finished artifact folder plus `entry.json`: the message and
the lint warnings the build printed (replayed on a hit) and the kernel object it compiled (which
must still be in the cache for a hit). Entries are written to a temporary folder and renamed
into place, so a crash never leaves half of one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

from graphc.cache import cache_dir

ARTIFACT_FILES = ("graph.json", "params.npz", "manifest.json")   # the manifest is written last
ENTRY = "entry.json"


@functools.cache
def _graphc_digest() -> str:
    h = hashlib.sha256()
    for package in ("graphc", "graphc.runtime", "graphc.grammar"):
        for root in find_spec(package).submodule_search_locations:
            for path in sorted(Path(root).rglob("*")):
                if path.suffix in (".py", ".lark") and "__pycache__" not in path.parts:
                    h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# The options of `graphc build` that reach the build (build_program, use_precision, the lints): each
# is part of the key, so a build asked for with other options is never answered by a stale entry.
# Adding an option to `build` that changes its artifact or its checks means adding it here.
BUILD_OPTIONS = ("model", "seed", "backend", "precision", "werror")


def build_key(path: str, source: bytes, options: dict[str, object]) -> str:
    """The key of a build of `source`, read from `path` (the artifact records the path as given,
    and source locations name it), with `options`: a value for each of BUILD_OPTIONS."""
    if sorted(options) != sorted(BUILD_OPTIONS):
        raise AssertionError(f"internal error: build options {sorted(options)}, "
                             f"expected {sorted(BUILD_OPTIONS)}")
    backend = options["backend"]
    if backend == "auto":       # the backend it stands for on this machine decides the build
        from graphc.targets import auto_backend
        backend = auto_backend()
    parts = [_graphc_digest(), path, f"resolved={backend}"] + [
        f"{name}={options[name]!r}" for name in BUILD_OPTIONS]
    if backend == "llvm":
        import llvmlite  # the package's version only: no LLVM is loaded

        from graphc.backends.host import cpu_key
        parts += [cpu_key(), llvmlite.__version__]
    h = hashlib.sha256("\0".join(parts).encode() + b"\0")
    h.update(source)
    if b"npz(" in source:       # parameters read by the npz initializer: their archives too
        for archive in sorted(Path(path).parent.glob("*.npz")):
            h.update(b"\0" + archive.name.encode() + b"\0")
            with open(archive, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:40]


def _entry_dir(key: str) -> Path:
    return cache_dir() / "builds" / key


def restore(key: str, out: Path) -> tuple[str, str] | None:
    """Copy a cached artifact to `out` and return what its build printed (the message, the lint
    warnings), or None when there is no complete entry (or the kernels it compiled left the
    cache)."""
    entry = _entry_dir(key)
    try:
        info = json.loads((entry / ENTRY).read_text())
        kernels = info.get("kernels")
        if kernels and not (cache_dir() / kernels).is_file():
            return None
        out.mkdir(parents=True, exist_ok=True)
        for name in ARTIFACT_FILES:               # each replaced atomically, the manifest last
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
            os.close(fd)
            try:
                shutil.copyfile(entry / name, tmp)
                os.replace(tmp, out / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return info["message"], info.get("warnings", "")
    except (OSError, ValueError, KeyError):
        return None


def store(key: str, artifact: Path, message: str, warnings: str, kernels: str | None) -> None:
    """Keep a copy of the artifact just built (best effort: a read-only cache is no error)."""
    entry = _entry_dir(key)
    if (entry / ENTRY).is_file():
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
        for name in ARTIFACT_FILES:
            shutil.copyfile(artifact / name, tmp / name)
        (tmp / ENTRY).write_text(json.dumps({"message": message, "warnings": warnings,
                                             "kernels": kernels}))
        try:
            os.replace(tmp, entry)
        except OSError:                           # another build stored it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass
