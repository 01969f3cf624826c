"""Runs peers side by side: a worker process per peer (bench/worker.py), started one at a time so
that no build competes with another, then timed blocks handed out round-robin, one worker
running at a time, with a pause between blocks so that thread pools left spinning by one peer
have gone to sleep before the next starts. Also picks each thread knob's setting by the same
round-robin (calibrate)."""
from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers import THREAD_CHOICES, PeerSpec, thread_setup
from bench.workloads import Workload

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 900     # torch.compile on two cores takes minutes, not hours
BLOCK_TIMEOUT_S = 300
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
QUIET_LOAD = 0.25         # a block is quiet when other processes used less than this many cores


@dataclass
class Settings:
    repeats: int            # timed blocks per worker process
    procs: int              # fresh sets of worker processes, each doing `repeats` blocks
    block_s: float          # how long a block should last (it sets the steps per block)
    gap_s: float            # the pause after every block
    steps: int | None = None
    calibrate_repeats: int = 5
    wait_quiet_s: float = 0.0   # before a block, wait up to this long for other processes to calm


@dataclass
class Worker:
    spec: PeerSpec
    threads: str | None
    proc: subprocess.Popen | None = None
    stderr: object = None
    ready: dict = field(default_factory=dict)
    reason: str | None = None

    @property
    def key(self) -> str:
        return self.spec.name if self.threads is None else f"{self.spec.name}@{self.threads}"

    def ask(self, command: dict, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(self.failure("no answer" if not ready else "exited"))
        return json.loads(line)

    def failure(self, what: str) -> str:
        self.stderr.seek(0)
        tail = [ln for ln in self.stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return f"worker {what}" + (f": {tail[-1][:300]}" if tail else "")

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait()
        self.proc = None


def spawn(spec: PeerSpec, threads: str | None, w: Workload, data: Path, s: Settings) -> Worker:
    """Start a worker and wait until it is built, checked and warm (or has said why it cannot)."""
    worker = Worker(spec, threads)
    env_extra, options = thread_setup(spec.knob, threads)
    config = {"peer": spec.name, "workload": w.key, "data": str(data), "warm_s": s.block_s,
              "steps": s.steps, "options": options}
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    worker.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the worker)
    worker.proc = subprocess.Popen([sys.executable, "-m", "bench.worker", json.dumps(config)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=worker.stderr,
                                   text=True, cwd=REPO, env=env)
    try:
        answer = worker.read(READY_TIMEOUT_S)
    except RuntimeError as exc:
        worker.reason = str(exc)
        return worker
    if answer["status"] != "ready":
        worker.reason = answer.get("reason", "skipped")
        worker.close()
    else:
        worker.ready = answer
    return worker


def _system_busy_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4]      # all but idle and iowait


def _process_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])         # utime + stime, all threads


def wait_for_quiet(limit_s: float, window_s: float = 0.2) -> float:
    """Wait (up to `limit_s`) until other processes use less than QUIET_LOAD cores over a short
    window, so that blocks start on a quiet machine more often; returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        busy0, w0 = _system_busy_ticks(), time.perf_counter()
        time.sleep(window_s)
        busy1, wall = _system_busy_ticks(), time.perf_counter() - w0
        if busy0 is None or busy1 is None or (busy1 - busy0) / CLOCK_TICKS / wall < QUIET_LOAD:
            break
    return time.perf_counter() - t0


def timed_block(worker: Worker) -> tuple[float, float | None]:
    """(seconds per step, cores' worth of CPU that other processes used meanwhile). The second
    tells a block run on a quiet machine from one that shared its cores."""
    steps = worker.ready["steps"]
    busy0, own0, t0 = _system_busy_ticks(), _process_ticks(worker.proc.pid), time.perf_counter()
    seconds = worker.ask({"cmd": "block", "steps": steps}, BLOCK_TIMEOUT_S)["seconds"]
    busy1, own1, wall = _system_busy_ticks(), _process_ticks(worker.proc.pid), time.perf_counter() - t0
    foreign = None
    if None not in (busy0, busy1, own0, own1):
        foreign = max(0.0, (busy1 - busy0 - (own1 - own0)) / CLOCK_TICKS / wall)
    return seconds / steps, foreign


def round_robin(workers: list[Worker], s: Settings, repeats: int) -> dict[str, list[list]]:
    """`repeats` blocks of every live worker, the starting worker rotating each round; returns
    [seconds per step, foreign load] of every block, by worker key. A worker that fails is
    dropped with its reason."""
    blocks: dict[str, list[list]] = {w.key: [] for w in workers}
    for r in range(repeats):
        live = [w for w in workers if w.proc]
        for worker in live[r % len(live):] + live[:r % len(live)] if live else []:
            if s.wait_quiet_s:
                wait_for_quiet(s.wait_quiet_s)
            try:
                blocks[worker.key].append(list(timed_block(worker)))
            except RuntimeError as exc:
                worker.reason = str(exc)
                continue
            time.sleep(s.gap_s)
    return blocks


def finish(worker: Worker) -> dict:
    """Memory and details from a worker, which then exits."""
    if not worker.proc:
        return {}
    try:
        answer = worker.ask({"cmd": "finish"}, BLOCK_TIMEOUT_S)
    except RuntimeError:
        return {}
    worker.close()
    return answer


def robust_median(blocks: list[list]) -> tuple[float, str]:
    """The median seconds per step over the quiet blocks where there are at least three (other
    processes on a shared machine distort the rest), else over all; and which it was."""
    quiet = [t for t, foreign in blocks if foreign is not None and foreign < QUIET_LOAD]
    if len(quiet) >= 3:
        return statistics.median(quiet), "quiet"
    return statistics.median(t for t, _ in blocks), "all"


def calibrate(specs: list[PeerSpec], w: Workload, data: Path, s: Settings) -> dict[str, dict]:
    """For each thread knob among `specs` (one peer per knob), time every choice in one
    round-robin; returns {knob: {"choice", "peer", "median_ms": {choice: ms}}}."""
    by_knob: dict[str, PeerSpec] = {}
    for spec in specs:
        if spec.knob and spec.knob not in by_knob:
            by_knob[spec.knob] = spec
    workers = []
    for spec in by_knob.values():
        for choice in THREAD_CHOICES:
            workers.append(spawn(spec, choice, w, data, s))
    times = round_robin([wk for wk in workers if wk.proc], s, s.calibrate_repeats)
    for worker in workers:
        finish(worker)
    result = {}
    for knob, spec in by_knob.items():
        medians = {wk.threads: robust_median(times[wk.key])[0] * 1e3 for wk in workers
                   if wk.spec is spec and times.get(wk.key)}
        if medians:
            result[knob] = {"peer": spec.name, "choice": min(medians, key=medians.get),
                            "median_ms": medians}
    return result


def run_workload(specs: list[PeerSpec], threads: dict[str, str | None], w: Workload, data: Path,
                 s: Settings, log) -> dict[str, dict]:
    """Every peer on `w`, `s.procs` times over in fresh processes; returns per peer: its blocks
    (seconds per step), its ready answer (checks, build times), memory and details, or why it
    was skipped."""
    out: dict[str, dict] = {spec.name: {"blocks": [], "runs": []} for spec in specs}
    for proc_round in range(s.procs):
        workers = []
        for spec in specs:
            if proc_round and out[spec.name].get("skipped"):
                continue
            log(f"  starting {spec.name}" + (f" (threads {threads[spec.knob]})"
                                             if threads.get(spec.knob) else ""))
            worker = spawn(spec, threads.get(spec.knob), w, data, s)
            if worker.reason and not worker.proc:
                out[spec.name]["skipped"] = worker.reason
                log(f"  skipped {spec.name}: {worker.reason}")
            workers.append(worker)
        live = [wk for wk in workers if wk.proc]
        log(f"  timing {len(live)} peers, {s.repeats} blocks each (process set {proc_round + 1}/{s.procs})")
        times = round_robin(live, s, s.repeats)
        for worker in live:
            record = out[worker.spec.name]
            record["blocks"] += times[worker.key]
            record["runs"].append({**worker.ready, **finish(worker)})
            if worker.reason:
                record["failed"] = worker.reason
    return out
