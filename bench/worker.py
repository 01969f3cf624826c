"""One peer on one workload, in a process of its own: `python -m bench.worker CONFIG_JSON`. It
imports the peer, builds it from the shared inputs, checks its first results, warms up, then
answers the harness's commands on stdin with one JSON line each on stdout:
`{"cmd": "block", "steps": K}` -> the seconds of K timed steps; `{"cmd": "finish"}` -> memory and
details, then it exits. Anything the peer prints goes to stderr."""
from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import time

from bench import machine
from bench.peers import PEERS, Runner
from bench.workloads import CHECK_STEPS, WORKLOADS, load


class Skip(Exception):
    """The peer cannot run here; the message says why."""


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip(": ")


def start(config: dict) -> tuple[Runner, dict]:
    spec, w = PEERS[config["peer"]], WORKLOADS[config["workload"]]
    cpus = config.get("options", {}).get("cpus")
    if cpus and hasattr(os, "sched_setaffinity"):   # before the import: pools size themselves then
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.peers.{spec.module}")
    except ImportError as exc:
        raise Skip(f"not installed ({_reason(exc)})") from exc
    import_s = time.perf_counter() - t0
    params, x, y, _ = load(config["data"])
    rss_base = machine.status_kb("VmRSS")
    hwm_reset = machine.reset_peak_rss()
    t0 = time.perf_counter()
    try:
        runner = getattr(module, spec.factory)(w, params, x, y, config.get("options", {}))
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = runner.run(0)       # compiles, for the peers that compile on first use
        runner.sync(first)
        first_s = time.perf_counter() - t0
        if spec.name == "floor":
            check = None
        elif w.kind == "train":     # the losses of the first steps, from the shared weights
            check = [float(runner.value(first))]
            check += [float(runner.value(runner.run(i))) for i in range(1, CHECK_STEPS)]
        else:
            check = runner.value(first).ravel().astype(float).tolist()
    except Exception as exc:   # a peer that cannot build or run here is skipped, with the reason
        raise Skip(_reason(exc)) from exc
    _warm_up(runner, config["warm_s"], w.kind == "infer")     # late compiles and recompiles
    steps, per_step = _warm_up(runner, config["warm_s"], w.kind == "infer")
    if config.get("steps"):
        steps = int(config["steps"])
    return runner, {"check": check, "import_s": import_s, "build_s": build_s, "first_s": first_s,
                    "steps": steps, "warm_ms": per_step * 1e3, "rss_base_kb": rss_base,
                    "hwm_reset": hwm_reset}


def _warm_up(runner: Runner, seconds: float, sync_each: bool) -> tuple[int, float]:
    """Run for about `seconds` (at least 3 calls); return the calls per timed block that make a
    block last about as long, and the time per call seen."""
    count, t0 = 0, time.perf_counter()
    while True:
        result = runner.run(count)
        if sync_each:
            runner.sync(result)
        count += 1
        elapsed = time.perf_counter() - t0
        if count >= 3 and elapsed >= seconds:
            break
    runner.sync(result)
    per_step = (time.perf_counter() - t0) / count
    return max(1, min(1_000_000, round(seconds / per_step))), per_step


def run_block(runner: Runner, start: int, steps: int, sync_each: bool) -> float:
    """One untimed call (it wakes sleeping thread pools), then `steps` timed ones."""
    gc.collect()
    runner.sync(runner.run(start))
    t0 = time.perf_counter()
    for i in range(start + 1, start + 1 + steps):
        result = runner.run(i)
        if sync_each:       # inference is latency: every call waits for its answer
            runner.sync(result)
    runner.sync(result)
    return time.perf_counter() - t0


def main() -> None:
    config = json.loads(sys.argv[1])
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())    # stray prints cannot corrupt the protocol

    def reply(obj: dict) -> None:
        protocol.write(json.dumps(obj) + "\n")

    try:
        runner, info = start(config)
    except Skip as exc:
        reply({"status": "skipped", "reason": str(exc)})
        return
    reply({"status": "ready", **info})
    sync_each = WORKLOADS[config["workload"]].kind == "infer"
    position = 1000
    while line := sys.stdin.readline():
        command = json.loads(line)
        if command["cmd"] == "block":
            seconds = run_block(runner, position, command["steps"], sync_each)
            position += command["steps"] + 1
            reply({"seconds": seconds})
        elif command["cmd"] == "finish":
            reply({"peak_rss_kb": machine.status_kb("VmHWM"), "rss_kb": machine.status_kb("VmRSS"),
                   "details": runner.details()})
            return


if __name__ == "__main__":
    main()
