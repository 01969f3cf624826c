"""Workload (e): how long graphc takes to compile every `models/*.nn` and make its first calls
(where a backend compiles its kernels), and to import, build and take the first step of (a),
each in a fresh process (bench/probe.py). "cold" runs get a new, empty GRAPHC_CACHE_DIR (the
llvm backend's on-disk kernel cache); "warm" runs reuse the folder of the last cold run."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.workloads import MODELS_DIR, WORKLOADS

REPO = Path(__file__).resolve().parent.parent


def _probe(mode: str, path: Path, backend: str, cache: Path) -> dict:
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.probe", mode, str(path), backend],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    wall = time.perf_counter() - t0
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = done.stderr.strip().splitlines()
        return {"error": f"exit status {done.returncode}: {tail[-1] if tail else 'no output'}"}
    return {**json.loads(lines[-1]), "process_s": wall}


def _series(mode: str, path: Path, backend: str, repeats: int) -> dict:
    """Medians of `repeats` cold runs (each with a new cache folder) and `repeats` warm ones."""
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="graphc-bench-cache-") as root:
        for r in range(repeats):
            cache = Path(root) / f"cold{r}"
            cache.mkdir()
            cold.append(_probe(mode, path, backend, cache))
            if "error" in cold[-1]:
                return {"skipped": cold[-1]["error"]}
        warm = [_probe(mode, path, backend, cache) for _ in range(repeats)]
    result = {}
    for name, runs in (("cold", cold), ("warm", warm)):
        ok = [run for run in runs if "error" not in run]
        if not ok:
            return {"skipped": runs[0]["error"]}
        result[name] = {key: statistics.median(run[key] for run in ok)
                        for key in ("import_s", "build_s", "first_s", "total_s", "process_s")
                        if ok[0].get(key) is not None}
    return result


def measure(backends: list[str], repeats: int, log) -> dict:
    """{"build": {backend: {model: series}}, "first_step": {backend: series}}"""
    models = sorted((REPO / "models").glob("*.nn"))
    out: dict = {"build": {}, "first_step": {}, "repeats": repeats}
    for backend in backends:
        log(f"  compile times, backend {backend}: {len(models)} models")
        out["build"][backend] = {}
        for path in models:
            out["build"][backend][path.name] = _series("build", path, backend, repeats)
        out["first_step"][backend] = _series("first_step", MODELS_DIR / WORKLOADS["a"].nn_file,
                                             backend, repeats)
    return out
