"""Workload (e): compile times of graphc, each in a fresh process. `cli` times the whole command
`python -m graphc build MODEL --backend B -o DIR` from outside, for every `models/*.nn`;
`build` times compile_file and the first calls (where a backend compiles its kernels) inside
bench/probe.py; `first_step` times import, build and the first train step of (a). "cold" runs
get a new, empty GRAPHC_CACHE_DIR (the llvm backend's on-disk kernel cache); "warm" runs reuse
the folder of the last cold run.

Bytecode: an installed graphc has its .pyc files (pip writes them), so the children drop
PYTHONDONTWRITEBYTECODE and keep their .pyc under PYTHONPYCACHEPREFIX, a folder in this run's
temporary directory, filled by untimed warm-up processes before anything is timed. "cold" means
an empty kernel cache, never missing bytecode. `cli` runs also record the CPU seconds the process
used (a cold llvm build compiles on every core, so its wall clock depends on how busy they are)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.workloads import MODELS_DIR, WORKLOADS

REPO = Path(__file__).resolve().parent.parent
QUICK_MODEL = "mnist_mlp.nn"        # --quick builds this one model only
PROBE_KEYS = ("import_s", "build_s", "first_s", "total_s", "process_s")


def _run_timed(args: list[str], cache: Path, tmp: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run `python ARGS` with the kernel cache `cache` and the bytecode under `tmp`; the wall
    clock from before the process starts to its exit, and the CPU seconds (user and system, all
    its threads) it used: on a busy machine the wall clock of a build that compiles on every core
    grows with the load, its CPU time hardly."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(GRAPHC_CACHE_DIR=str(cache), PYTHONPYCACHEPREFIX=str(tmp / "pycache"),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    before = _children_cpu()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    return time.perf_counter() - t0, _children_cpu() - before, done


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _failure(done: subprocess.CompletedProcess) -> str:
    tail = done.stderr.strip().splitlines()
    return f"exit status {done.returncode}: {tail[-1] if tail else 'no output'}"


def _probe(mode: str, path: Path, backend: str, cache: Path, tmp: Path) -> dict:
    wall, _, done = _run_timed(["-m", "bench.probe", mode, str(path), backend], cache, tmp)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"error": _failure(done)}
    return {**json.loads(lines[-1]), "process_s": wall}


def _cli(path: Path, backend: str, cache: Path, tmp: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="artifact-", dir=tmp))
    wall, cpu, done = _run_timed(["-m", "graphc", "build", str(path), "--backend", backend, "-o",
                                  str(out)], cache, tmp)
    shutil.rmtree(out, ignore_errors=True)
    return {"error": _failure(done)} if done.returncode else {"process_s": wall, "cpu_s": cpu}


def _cold_then_warm(run: Callable[[Path], dict], repeats: int, tmp: Path) -> tuple[list, list]:
    """`repeats` cold runs, each with a new cache folder, then `repeats` warm runs in the last
    one; stops after the first cold run that fails."""
    cold: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="caches-", dir=tmp) as caches:
        for _ in range(repeats):
            cache = Path(tempfile.mkdtemp(prefix="cold-", dir=caches))
            cold.append(run(cache))
            if "error" in cold[-1]:
                return cold, []
        return cold, [run(cache) for _ in range(repeats)]


def _probe_series(mode: str, path: Path, backend: str, repeats: int, tmp: Path) -> dict:
    """Medians of the cold and of the warm probes; a failed warm probe is left out."""
    cold, warm = _cold_then_warm(lambda cache: _probe(mode, path, backend, cache, tmp), repeats, tmp)
    if "error" in cold[-1]:
        return {"skipped": cold[-1]["error"]}
    result = {}
    for name, runs in (("cold", cold), ("warm", warm)):
        ok = [run for run in runs if "error" not in run]
        if not ok:
            return {"skipped": runs[0]["error"]}
        result[name] = {key: statistics.median(run[key] for run in ok)
                        for key in PROBE_KEYS if ok[0].get(key) is not None}
    return result


def _cli_series(path: Path, backend: str, repeats: int, tmp: Path) -> dict:
    """Median seconds of the whole `graphc build` process, cold and warm, and every run's, with
    the median CPU seconds it used; any run that exits with a non-zero status makes the series an
    error."""
    cold, warm = _cold_then_warm(lambda cache: _cli(path, backend, cache, tmp), repeats, tmp)
    failed = [run["error"] for run in cold + warm if "error" in run]
    if failed:
        return {"error": failed[0]}
    return {name: {"process_s": statistics.median(run["process_s"] for run in runs),
                   "cpu_s": statistics.median(run["cpu_s"] for run in runs),
                   "runs_s": [round(run["process_s"], 4) for run in runs]}
            for name, runs in (("cold", cold), ("warm", warm))}


def _write_bytecode(backends: list[str], model: Path, tmp: Path) -> None:
    """Untimed: per backend, one `graphc build` of `model` and one probe of (a), each with an
    empty kernel cache (a cold run imports all that a warm one does), so that the timed
    processes find the .pyc of every module they import."""
    first_step = MODELS_DIR / WORKLOADS["a"].nn_file
    with tempfile.TemporaryDirectory(prefix="caches-", dir=tmp) as caches:
        for backend in backends:
            _cli(model, backend, Path(tempfile.mkdtemp(dir=caches)), tmp)
            _probe("first_step", first_step, backend, Path(tempfile.mkdtemp(dir=caches)), tmp)


def measure(backends: list[str], repeats: int, log, quick: bool = False) -> dict:
    """{"build": {backend: {model: series}}, "first_step": {backend: series},
    "cli": {backend: {model: series}}}; `quick` keeps one model."""
    models = sorted((REPO / "models").glob("*.nn"))
    if quick:
        models = [path for path in models if path.name == QUICK_MODEL] or models[:1]
    out: dict = {"build": {}, "first_step": {}, "cli": {}, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="graphc-bench-e-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"  writing bytecode under {tmp / 'pycache'} (untimed)")
        _write_bytecode(backends, models[0], tmp)
        for backend in backends:
            log(f"  compile times, backend {backend}: {len(models)} models")
            out["build"][backend] = {path.name: _probe_series("build", path, backend, repeats, tmp)
                                     for path in models}
            out["first_step"][backend] = _probe_series("first_step", MODELS_DIR / WORKLOADS["a"].nn_file,
                                                       backend, repeats, tmp)
            log(f"  graphc build, backend {backend}: {len(models)} models")
            out["cli"][backend] = {path.name: _cli_series(path, backend, repeats, tmp) for path in models}
    return out
