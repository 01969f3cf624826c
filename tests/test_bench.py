"""A smoke test of the benchmark harness (bench/): a few seconds, the graphc peers and the
hand-written numpy step on the overhead-bound workload. Speed itself is measured by
`python -m bench`, never in tests."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_run_checks_and_reports(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--workloads", "c", "--peers",
                           "numpy_hand,graphc_numpy,graphc_llvm", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    peers = results["workloads"]["c"]["peers"]
    for peer in ("numpy_hand", "graphc_numpy", "graphc_llvm"):
        assert peers[peer]["status"] == "ok", peers[peer]
        assert peers[peer]["check"]["ok"], peers[peer]["check"]
        assert peers[peer]["median_ms"] > 0
    assert results["machine"]["cores"] >= 1
