"""Bench workload (g), PyTorch's MNIST CNN: its products (the floor) and PyTorch eager's step
computing what graphc's does from the same parameters and batches."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workloads(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))       # bench/ is not installed
    from bench import workloads
    return workloads


def test_g_selects_the_train_step_and_batch_one(workloads):
    assert [w.key for w in workloads.select("g")] == ["g", "g1"]
    g, g1 = workloads.WORKLOADS["g"], workloads.WORKLOADS["g1"]
    assert (g.batch, g.kind, g1.batch, g1.kind) == (64, "train", 1, "infer")


def test_the_floor_is_the_im2col_products(workloads):
    g = workloads.WORKLOADS["g"]
    shapes = workloads.matmul_shapes(g)
    pixels1, pixels2 = 64 * 26 * 26, 64 * 24 * 24
    # conv1: forward and weight gradient (the input needs none); conv2: all three; the dense
    # layers: forward, weight and input gradients
    assert shapes[:5] == [(32, 9, pixels1, "nn"), (32, pixels1, 9, "nt"), (64, 288, pixels2, "nn"),
                          (64, pixels2, 288, "nt"), (288, 64, pixels2, "tn")]
    assert len(shapes) == 5 + 2 + 4
    flops = workloads.matmul_flops(g)
    assert flops == 2 * (2 * 32 * 9 * pixels1 + 3 * 64 * 288 * pixels2 + 3 * 64 * 9216 * 128
                         + 3 * 64 * 128 * 10)
    assert 4.5e9 < flops < 4.7e9                  # the "about 4.6 GFLOP"
    inference = workloads.matmul_shapes(workloads.WORKLOADS["g1"])
    assert inference == [(32, 9, 676, "nn"), (64, 288, 576, "nn"), (1, 9216, 128, "nn"), (1, 128, 10, "nn")]


def test_pytorch_eager_trains_what_graphc_trains(workloads, tmp_path):
    pytest.importorskip("torch")
    from bench.peers.torch_peers import build_eager
    g = workloads.WORKLOADS["g"]
    params, x, y, check = workloads.load(workloads.prepare(g, tmp_path))
    assert x.shape == (workloads.N_BATCHES, 64, 1, 28, 28)
    runner = build_eager(g, params, x, y, {"threads": 1})
    losses = [float(runner.value(runner.run(i))) for i in range(workloads.CHECK_STEPS)]
    ok, worst = workloads.check_ok(losses, check)
    assert ok, (losses, check.tolist(), worst)
    assert len(set(check.tolist())) == 3          # three real steps, not one loss repeated
