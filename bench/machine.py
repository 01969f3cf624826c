"""What the results were measured on: the CPU (model, cores, SIMD flags), the libraries and their
BLAS, the load; a hostname-free tag for the results' file name; and the resident-set readings
(/proc/self/status) that peak memory is measured with."""
from __future__ import annotations

import os
import platform
import re
from importlib import metadata

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile")
LIBRARIES = ("numpy", "torch", "jax", "jaxlib", "llvmlite", "threadpoolctl", "graphc")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def describe() -> dict:
    """The machine and software, as recorded in the results."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu.get("model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "memory_gb": round(_meminfo_kb("MemTotal") / 2**20, 1) if _meminfo_kb("MemTotal") else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "numpy_blas": numpy_blas(),
        "hypervisor": "hypervisor" in flags,
    }


def numpy_blas() -> dict:
    """The BLAS numpy links, from numpy's build configuration and, where threadpoolctl is
    installed, the library actually loaded and its thread count."""
    import numpy as np

    found: dict = {}
    try:
        config = np.show_config(mode="dicts")
        blas = config.get("Build Dependencies", {}).get("blas", {})
        found = {"name": blas.get("name"), "version": blas.get("version"),
                 "configuration": blas.get("openblas configuration")}
    except (TypeError, AttributeError):
        pass
    try:
        import threadpoolctl

        found["loaded"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads",
                                                  "architecture", "threading_layer")}
                           for i in threadpoolctl.threadpool_info()]
    except ImportError:
        pass
    return found


def tag(machine: dict) -> str:
    """A file-name-safe tag without the host name: `amd-epyc-2c-avx2`."""
    words = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*|\d+-core", " ", machine["cpu"].lower())
    words = re.sub(r"[^a-z0-9]+", "-", words).strip("-")
    simd = [f for f in ("avx512f", "avx2", "avx") if f in machine["simd"]]
    return f"{words[:40].strip('-') or 'cpu'}-{machine['cores']}c-{(simd or ['nosimd'])[0]}"


def load_average() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def _proc_kb(path: str, key: str) -> int | None:
    """A `KEY: value kB` field of a /proc file, None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _meminfo_kb(key: str) -> int | None:
    return _proc_kb("/proc/meminfo", key)


def status_kb(key: str) -> int | None:
    """A field of /proc/self/status in kB (`VmRSS`, `VmHWM`), None where there is none."""
    return _proc_kb("/proc/self/status", key)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
