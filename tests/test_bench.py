"""A smoke test of the benchmark harness (bench/): a few seconds, the graphc peers and the
hand-written numpy step on the overhead-bound workload. Speed itself is measured by
`python -m bench`, never in tests."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench_modules(monkeypatch):
    """bench/ is not installed: import it from the repository, as `python -m bench` does."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import compile_time, report

    return compile_time, report


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


def test_compile_times_time_the_build_command(tmp_path, bench_modules):
    compile_time, report = bench_modules
    result = compile_time.measure(["numpy"], 1, lambda message: None, quick=True)
    (model, series), = result["cli"]["numpy"].items()
    assert model == compile_time.QUICK_MODEL
    for name in ("cold", "warm"):
        assert 0 < series[name]["process_s"] < 60
        assert result["build"]["numpy"][model][name]["process_s"] > 0
    text = report.compile_table(result)
    assert "graphc build" in text and "under 2 s" in text and "under 0.3 s" in text
    assert f"numpy  {model}" in text.split("graphc build")[1]
    failed = compile_time._cli_series(tmp_path / "missing.nn", "numpy", 1, tmp_path)
    assert failed["error"].startswith("exit status 1")


def test_compile_table_reads_results_without_the_build_command_series(bench_modules):
    _, report = bench_modules
    timings = {"build_s": 0.3, "first_s": 0.1, "total_s": 0.4, "process_s": 0.5}
    old = {"repeats": 3, "build": {"numpy": {"m.nn": {"cold": timings, "warm": timings}}},
           "first_step": {"numpy": {"skipped": "no"}}}
    assert "m.nn" in report.compile_table(old) and "graphc build" not in report.compile_table(old)


def test_sample_words_counts_the_share_of_words_the_training_text_has(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import sample_words

    vocabulary = set(sample_words.words("Thou art my LORD; 'tis so. O'er the hill"))
    assert {"thou", "lord", "'tis", "o'er"} <= vocabulary
    assert sample_words.known_share("thou art zqx,\nmy Lord wizzle", vocabulary) == pytest.approx(4 / 6)
    assert sample_words.known_share("\n\n:!", vocabulary) == 0.0
