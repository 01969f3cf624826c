"""The machine the compiled backends run on: how many cores this process may use, and what names
its CPU in the keys of cached native code."""
from __future__ import annotations

import functools
import os
from pathlib import Path


def usable_cores() -> int:
    """The cores this process may run on (the affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:            # not on Linux
        return os.cpu_count() or 1


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
    return cpu_description()


@functools.cache
def cpu_description() -> str:
    """LLVM's name and feature flags of this CPU (llvmlite is imported here, on first use)."""
    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    return f"{llvm.get_host_cpu_name()} {llvm.get_host_cpu_features().flatten()}"
