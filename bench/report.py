"""Turns what the workers measured into results: medians, samples/s, memory, the ratios to
PyTorch eager and to the matmul floor, the correctness checks; prints them as tables and writes
the JSON file."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from bench.harness import QUIET_LOAD, robust_median
from bench.peers import PEERS, REFERENCE
from bench.workloads import Workload, check_ok, matmul_flops


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(w: Workload, raw: dict[str, dict], reference: np.ndarray) -> dict:
    """One workload's results: per peer, either the reason it was skipped or its numbers."""
    peers: dict[str, dict] = {}
    for name, record in raw.items():
        blocks = record["blocks"]
        if not blocks:
            peers[name] = {"status": "skipped",
                           "reason": record.get("skipped") or record.get("failed") or "no timed block"}
            continue
        runs = record["runs"]
        median, over = robust_median(blocks)
        times = [t for t, _ in blocks]
        used = times if over == "all" else [t for t, f in blocks if f is not None and f < QUIET_LOAD]
        q1, _, q3 = statistics.quantiles(used, n=4) if len(used) > 1 else (median,) * 3
        loads = [f for _, f in blocks if f is not None]
        entry = {"status": "ok", "median_ms": median * 1e3, "median_over": over,
                 "median_all_ms": statistics.median(times) * 1e3, "best_ms": min(times) * 1e3,
                 "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "samples_per_s": w.batch / median,
                 "blocks": len(blocks), "quiet_blocks": sum(f < QUIET_LOAD for f in loads),
                 "foreign_load_median": statistics.median(loads) if loads else None,
                 "blocks_ms": [round(t * 1e3, 6) for t in times],
                 "blocks_foreign_load": [None if f is None else round(f, 3) for _, f in blocks],
                 "steps_per_block": [run.get("steps") for run in runs],
                 "import_s": _median(run.get("import_s") for run in runs),
                 "build_s": _median(run.get("build_s") for run in runs),
                 "first_call_s": _median(run.get("first_s") for run in runs),
                 "details": runs[0].get("details", {})}
        peaks = [run["peak_rss_kb"] for run in runs if run.get("peak_rss_kb")]
        if peaks:
            entry["peak_rss_mb"] = max(peaks) / 1024
            growth = [run["peak_rss_kb"] - run["rss_base_kb"] for run in runs
                      if run.get("peak_rss_kb") and run.get("rss_base_kb") and run.get("hwm_reset")]
            entry["rss_growth_mb"] = max(growth) / 1024 if growth else None
        checks = [check_ok(run["check"], reference) for run in runs if run.get("check") is not None]
        if checks:
            entry["check"] = {"ok": all(ok for ok, _ in checks), "max_diff": max(d for _, d in checks)}
        if record.get("failed"):
            entry["failed_later"] = record["failed"]
        peers[name] = entry
    for key, base in (("vs_torch_eager", REFERENCE), ("vs_floor", "floor")):
        ref = peers.get(base, {}).get("median_ms")
        for entry in peers.values():
            if entry["status"] == "ok" and ref:
                entry[key] = entry["median_ms"] / ref
    floor = peers.get("floor", {})
    return {"title": w.title, "kind": w.kind, "batch": w.batch, "sizes": list(w.sizes),
            "matmul_gflop": matmul_flops(w) / 1e9,
            "floor_matmuls": floor.get("details", {}).get("matmuls"),
            "peers": peers}


def table(result: dict) -> str:
    """A workload's results as a text table, with a loud line for every failed check."""
    infer = result["kind"] == "infer"
    unit, scale = ("us/call", 1e3) if infer else ("ms/step", 1.0)
    header = ["peer", unit, "IQR", "quiet", "samples/s", "peak RSS MB (+growth)", "x torch eager",
              "x floor", "check", "build+1st s"]
    rows, alarms = [], []
    for name, e in result["peers"].items():
        label = PEERS[name].label
        if e["status"] != "ok":
            rows.append([label, "skipped: " + e["reason"][:90]])
            continue
        spread = (e["q3_ms"] - e["q1_ms"]) / e["median_ms"] * 100
        memory = f"{e['peak_rss_mb']:.0f}" if e.get("peak_rss_mb") else "?"
        if e.get("rss_growth_mb") is not None:
            memory += f" (+{e['rss_growth_mb']:.1f})"
        check = e.get("check")
        mark = "-" if check is None else ("ok" if check["ok"] else "MISMATCH")
        if check and not check["ok"]:
            alarms.append(f"!! {label}: its first results differ from graphc numpy's "
                          f"(largest difference {check['max_diff']:.3g}); its timings compare "
                          "different computations")
        star = "" if e["median_over"] == "quiet" else "*"
        if e.get("failed_later"):
            alarms.append(f"!! {label} stopped before the last block: {e['failed_later']}")
        rows.append([label, f"{e['median_ms'] * scale:.4g}{star}", f"{spread:.0f}%",
                     f"{e['quiet_blocks']}/{e['blocks']}", f"{e['samples_per_s']:,.0f}", memory,
                     _ratio(e.get("vs_torch_eager")), _ratio(e.get("vs_floor")), mark,
                     f"{e['build_s'] + e['first_call_s']:.2f}"])
    full = [header] + [r for r in rows if len(r) == len(header)]    # skipped rows span the line
    widths = [max(len(str(r[i])) for r in full) for i in range(len(header))]
    load = result.get("load_average")
    lines = [result["title"] + f"  [{result['matmul_gflop'] * 1e3:.3g} MFLOP of matmul per call"
             + (f"; load average {load[0]:.2f}" if load else "") + "]",
             "  ".join(h.ljust(wd) for h, wd in zip(header, widths))]
    lines.append("  ".join("-" * wd for wd in widths))
    for row in rows:
        if len(row) == 2:
            lines.append(row[0].ljust(widths[0]) + "  " + row[1])
        else:
            lines.append("  ".join(c.ljust(wd) if i == 0 else c.rjust(wd)
                                   for i, (c, wd) in enumerate(zip(row, widths))))
    notes = []
    if result.get("threads"):
        how = "picked by measuring 1 and all" if result.get("calibration") else "as set"
        notes.append("threads: " + ", ".join(f"{knob} {choice or 'default'}"
                                             for knob, choice in sorted(result["threads"].items()))
                     + f" ({how}); numpy by hand and graphc: library defaults")
    if result.get("floor_matmuls"):
        notes.append("floor matmuls, each timed alone: " + ", ".join(
            f"{m['m']}x{m['k']}x{m['n']} {m['layout']} {m['us']:.3g} us ({m['gflops']:.0f} GFLOP/s)"
            for m in result["floor_matmuls"]))
    if any(e.get("median_over") == "all" for e in result["peers"].values()):
        notes.append("* fewer than 3 quiet blocks: the median of all blocks")
    return "\n".join(lines + notes + alarms)


def _ratio(value) -> str:
    return f"{value:.2f}x" if value is not None else "-"


GOAL_S = {"cold": 2.0, "warm": 0.3}    # the project's goal for `graphc build` of any model
FIRST_STEP_GOAL_S = 0.5                # and for import + build + first step of (a), warm


def compile_table(result: dict) -> str:
    """Workload (e) as text: per backend and model, cold and warm medians, in process, then of
    the whole `graphc build` command (results files older than that series have none)."""
    lines = [f"(e) compile time in a fresh process, medians of {result['repeats']}, in s: "
             "compile_file (its imports included) + first calls (one forward, one train step on "
             "zeros) = in-process; whole process. Goal for the (a) rows: in-process warm under "
             f"{FIRST_STEP_GOAL_S:g} s"]
    for backend, models in result["build"].items():
        for model, series in models.items():
            lines.append(f"  {backend:6} {model:26} " + _series_text(series))
    for backend, series in result["first_step"].items():
        lines.append(f"  {backend:6} {'(a): import+build+1st step':26} " + _series_text(series))
    if "cli" in result:
        lines += ["", f"(e) `python -m graphc build MODEL --backend B -o DIR`, the whole process, "
                  f"medians of {result['repeats']}, in s. Goal: cold (empty kernel cache) under "
                  f"{GOAL_S['cold']:g} s, warm under {GOAL_S['warm']:g} s; ! over it"]
        for backend, models in result["cli"].items():
            for model, series in models.items():
                lines.append((f"  {backend:6} {model:26} " + _cli_text(series)).rstrip())
    return "\n".join(lines)


def _cli_text(series: dict) -> str:
    if "error" in series:
        return "error: " + series["error"][:90]
    return "   ".join(f"{name} {series[name]['process_s']:.3f}"
                      + ("!" if series[name]["process_s"] > goal else " ")
                      for name, goal in GOAL_S.items())


def _series_text(series: dict) -> str:
    if "skipped" in series:
        return "skipped: " + series["skipped"][:90]
    parts = []
    for name in ("cold", "warm"):
        s = series[name]
        parts.append(f"{name} {s['build_s']:.3f} + {s['first_s']:.3f} = {s['total_s']:.3f}; "
                     f"{s['process_s']:.3f}")
    return "   ".join(parts)


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
