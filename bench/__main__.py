"""`python -m bench`: run the workloads in graphc and every installed peer, side by side, print a
table per workload and write the results as JSON (bench/results/ by default)."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench import compile_time, harness, machine, peers, report, workloads

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHOD = {
    "timing": "each peer runs in its own worker process; timed blocks are handed out round-robin, "
              "one worker at a time, the first worker rotating each round, with a pause after "
              "every block; a block is one untimed call then K timed ones (K set by a warm-up so "
              "that a block lasts about block_s); the block's time per call, over all blocks of "
              "all process sets, gives the median (see quiet)",
    "quiet": "the harness reads /proc/stat around every block: CPU time other processes used "
             "meanwhile, in cores ('foreign load'); a block is quiet below 0.25 cores; median_ms "
             "is the median of the quiet blocks where there are at least 3 (median_over: quiet), "
             "else of all blocks (median_over: all); median_all_ms is always over all",
    "sync": "training blocks wait for the peer's last result at the end of the block (JAX "
            "dispatches asynchronously); inference waits for every call's answer",
    "floor": "the 'floor' peer calls numpy's BLAS once for every matrix product of the step, at "
             "its shapes and operand layouts (floor_matmuls: each timed alone), and nothing else",
    "memory": "peak_rss_mb is the worker's VmHWM at the end; rss_growth_mb is VmHWM minus the "
              "resident set after the imports and the shared inputs were loaded, VmHWM being "
              "reset there (/proc/self/clear_refs): what building and running the peer added",
    "check": "before timing, every peer's first results from graphc's initial parameters "
             "(training: the first three losses; inference: the output) are compared with "
             "graphc numpy's (|diff| <= 1e-4 + 1e-3 |ref|)",
    "threads": "'threads' per workload: the setting of each knob (blas: the floor's OpenBLAS; "
               "torch: torch.set_num_threads, for eager and compile; xla: JAX, whose '1' pins the "
               "worker to one core, XLA_FLAGS' thread options having no effect in jax 0.10); with "
               "--threads auto a calibration round-robin picks the faster of 1 and all cores per "
               "workload ('calibration'); numpy by hand and graphc use their libraries' defaults",
    "compile": "(e): each measurement is a fresh process (bench/probe.py): build_s is "
               "graphc.compile_file with the imports it triggers, first_s the first calls (build: "
               "one forward and one train step on zeros, batch 8; first_step: one train step of "
               "(a) at batch 64), total_s from before `import graphc`, process_s the whole process "
               "seen from outside; cli: process_s of `python -m graphc build MODEL --backend B -o "
               "DIR`, from before the process starts to its exit (status 0, else an error); cold: "
               "a new empty GRAPHC_CACHE_DIR each time, warm: the last cold folder again; medians "
               "of the repeats; every process writes and reads .pyc files (PYTHONDONTWRITEBYTECODE "
               "unset, PYTHONPYCACHEPREFIX in a temporary folder), written by untimed warm-up runs "
               "first, as an installed package has them; --quick: one model",
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--workloads", default="a,b,c,d,e",
                   help="comma list of a, b, c, d (inference at batch 1 and 64), e (compile times), "
                        "f (a character-level GPT's train step; not in the default list)")
    p.add_argument("--peers", default="all", help="'all' or a comma list of "
                   f"{', '.join(n for n in peers.PEERS if n != 'floor')} (the floor is always run)")
    p.add_argument("--repeats", type=int, help="timed blocks per peer and process set (default 10)")
    p.add_argument("--procs", type=int, help="fresh sets of worker processes (default 2)")
    p.add_argument("--steps", type=int, help="calls per timed block (default: about --block-ms long)")
    p.add_argument("--block-ms", type=float, help="target length of a block (default 250)")
    p.add_argument("--threads", choices=["auto", "1", "all", "default"],
                   help="thread setting of torch, JAX and the floor's BLAS: 'auto' (the default) "
                        "picks 1 or all cores per workload by measuring both")
    p.add_argument("--wait-quiet", type=float, metavar="S",
                   help="before each block, wait up to S seconds for other processes to leave the "
                        "CPU idle (default 2; 0 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a few short blocks, one process set, no calibration, (e) on one model once: "
                        "a smoke test")
    p.add_argument("--out", type=Path, help="the results file (default bench/results/TIME-MACHINE.json; "
                   "with --quick, a temporary file)")
    p.add_argument("--show", type=Path, metavar="FILE", help="print the tables of a results file and exit")
    args = p.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (3 if quick else 10)
    args.procs = args.procs or (1 if quick else 2)
    args.block_ms = args.block_ms or (30 if quick else 250)
    args.threads = args.threads or ("default" if quick else "auto")
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if quick else 2.0
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.show:
        return show(args.show)
    try:
        specs = peers.select(args.peers)
        chosen = workloads.select(args.workloads)
    except ValueError as exc:
        log(f"error: {exc}")
        return 2
    settings = harness.Settings(repeats=args.repeats, procs=args.procs, block_s=args.block_ms / 1e3,
                                gap_s=0.01 if args.quick else 0.15, steps=args.steps,
                                calibrate_repeats=5, wait_quiet_s=args.wait_quiet)
    started, t0 = dt.datetime.now(dt.UTC), time.perf_counter()
    described = machine.describe()
    results = {"format": "graphc-bench", "version": 1,
               "command": "python -m bench " + shlex.join(argv),
               "started_utc": started.isoformat(timespec="seconds"), "machine": described,
               "load_average_before": machine.load_average(),
               "settings": {k: getattr(args, k) for k in ("workloads", "peers", "repeats", "procs",
                                                          "steps", "block_ms", "threads", "wait_quiet",
                                                          "quick")},
               "method": METHOD, "workloads": {}}
    log(f"{described['cpu']}, {described['cores']} cores ({' '.join(described['simd'])}); "
        f"load {results['load_average_before']}")
    mismatch = False
    with tempfile.TemporaryDirectory(prefix="graphc-bench-") as tmp:
        for w in chosen:
            log(f"{w.title}")
            data = workloads.prepare(w, Path(tmp))
            threads, calibration = _threads(args.threads, specs, w, data, settings)
            raw = harness.run_workload(specs, threads, w, data, settings, log)
            summary = report.summarize(w, raw, workloads.load(data)[3])
            summary.update(threads=threads, calibration=calibration,
                           load_average=machine.load_average())
            results["workloads"][w.key] = summary
            mismatch |= any(e.get("check", {}).get("ok") is False for e in summary["peers"].values())
            print(report.table(summary) + "\n", flush=True)
    if "e" in {k.strip() for k in args.workloads.split(",")}:
        log("(e) compile times")
        results["compile"] = compile_time.measure(["numpy", "llvm"], 1 if args.quick else 3, log,
                                                  quick=args.quick)
        print(report.compile_table(results["compile"]) + "\n", flush=True)
    results["load_average_after"] = machine.load_average()
    results["duration_s"] = time.perf_counter() - t0
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = args.out or (Path(tempfile.gettempdir()) / f"graphc-bench-quick-{stamp}.json" if args.quick
                       else RESULTS_DIR / f"{stamp}-{machine.tag(described)}.json")
    report.write(out, results)
    print(f"results: {out}")
    if mismatch:
        log("!! some peers computed something different from graphc numpy: see MISMATCH above")
    return 1 if mismatch else 0


def show(path: Path) -> int:
    results = json.loads(path.read_text())
    print(f"{results['command']}  ({results['started_utc']}, {results['machine']['cpu']}, "
          f"{results['machine']['cores']} cores)\n")
    for summary in results["workloads"].values():
        print(report.table(summary) + "\n")
    if "compile" in results:
        print(report.compile_table(results["compile"]))
    return 0


def _threads(mode: str, specs, w, data, settings) -> tuple[dict[str, str | None], dict | None]:
    """Each thread knob's setting for this workload, and the calibration behind it (if any)."""
    knobs = {spec.knob for spec in specs if spec.knob}
    if mode == "default":
        return {knob: None for knob in knobs}, None
    if mode in ("1", "all"):
        return {knob: mode for knob in knobs}, None
    log("  calibrating threads: " + ", ".join(sorted(knobs)))
    calibration = harness.calibrate(specs, w, data, settings)
    for knob, c in calibration.items():
        log(f"    {knob}: " + ", ".join(f"{k} -> {v:.4g} ms" for k, v in c["median_ms"].items())
            + f"; using {c['choice']}")
    return {knob: calibration.get(knob, {}).get("choice") for knob in knobs}, calibration


if __name__ == "__main__":
    sys.exit(main())
