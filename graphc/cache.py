"""Where graphc keeps what it can rebuild: parser tables, compiled kernels, built artifacts.

$GRAPHC_CACHE_DIR when set, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache) /graphc.
Everything here is derived from graphc itself, keyed by content hashes; deleting it is always safe.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("GRAPHC_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphc"


@functools.cache
def cpu_key() -> str:
    """What names this CPU in cache keys. Where the OS lists the CPU's model and feature flags
    (Linux's /proc/cpuinfo: the same CPUID bits LLVM reads) they are used, so a build whose code
    is cached never loads LLVM (30 ms); elsewhere LLVM's own description."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return _llvm_cpu()
    wanted = ("vendor_id", "model name", "cpu family", "model", "flags",     # x86
              "CPU implementer", "CPU part", "CPU variant", "Features")       # ARM
    found: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in wanted and key not in found:
            found[key] = value.strip()
    if "flags" not in found and "Features" not in found:
        return _llvm_cpu()
    return "cpuinfo " + "; ".join(f"{k}={v}" for k, v in sorted(found.items()))


def _llvm_cpu() -> str:
    from graphc.runtime.llvm.jit import cpu_description
    return cpu_description()
