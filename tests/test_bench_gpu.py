"""bench/gpu.py without a GPU: one sentence saying what is missing, exit status 1, no results
file; and its graphc measurements, small, on the emulated device. (On a GPU it is a benchmark,
run by hand: see docs/cuda.md.)"""
from __future__ import annotations

from pathlib import Path

import pytest
from emulated_device import emulated_pycuda

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu(monkeypatch):
    """bench/ is not installed: import it from the repository, as `python bench/gpu.py` does."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import gpu
    return gpu


def test_without_a_gpu_it_says_what_is_missing(gpu, capsys, tmp_path):
    try:
        gpu._gpu()
        pytest.skip("a GPU is here; the message is for machines without one")
    except gpu.Unavailable:
        pass
    out = tmp_path / "r.json"
    assert gpu.main(["--steps", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: bench/gpu.py needs a CUDA GPU: ") and err.count("\n") == 1
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("queued", [False, True])
def test_its_graphc_measurements_run_on_the_emulated_device(gpu, queued):
    with emulated_pycuda():
        assert gpu.graphc_train("mnist_mlp.nn", 8, 2, "f32", queued) > 0
        if queued:
            assert gpu.graphc_gemm(64, 1, "f32") > 0
