"""Shared test helpers: the repository root, the bundled models, and running one op on arrays.

The session gets its own empty cache folder ($GRAPHC_CACHE_DIR, inherited by the subprocesses
tests start), so no result depends on what this machine built before; a test that needs a warm
cache warms it itself.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from graphc.backends.numpy.executor import NumpyExecutor
from graphc.ir import ops as op_table
from graphc.ir.node import Graph
from graphc.ir.types import DType, TensorType
from graphc.passes import PipelineOptions, run_pipeline

REPO = Path(__file__).resolve().parent.parent
# models/shakespeare_gpt.nn (800k parameters, trained by steps on text) is too large for the
# per-model checks, each of which would take minutes on two cores: test_text_steps.py trains it,
# and test_attention.py holds a tiny GPT of the same ops to PyTorch and finite differences.
LARGE_MODELS = {"shakespeare_gpt"}
MODELS = [m for m in sorted((REPO / "models").glob("*.nn")) if m.stem not in LARGE_MODELS]


def pytest_configure(config):
    config._graphc_cache = tempfile.mkdtemp(prefix="graphc-test-cache-")
    config._graphc_user_cache = os.environ.get("GRAPHC_CACHE_DIR")
    os.environ["GRAPHC_CACHE_DIR"] = config._graphc_cache


def pytest_unconfigure(config):
    shutil.rmtree(config._graphc_cache, ignore_errors=True)
    if config._graphc_user_cache is None:
        os.environ.pop("GRAPHC_CACHE_DIR", None)
    else:
        os.environ["GRAPHC_CACHE_DIR"] = config._graphc_user_cache


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A good mnist_mlp artifact, built once per test module (artifact and loader tests)."""
    import graphc
    folder = tmp_path_factory.mktemp("pristine") / "mlp"
    graphc.compile_file(REPO / "models" / "mnist_mlp.nn").save(folder)
    return folder


@pytest.fixture
def art(pristine, tmp_path) -> Path:
    """A fresh copy of `pristine`, free to damage."""
    folder = tmp_path / "art"
    shutil.copytree(pristine, folder)
    return folder


@pytest.fixture
def repo() -> Path:
    return REPO


def op_graph(op: str, arrays: list[np.ndarray], attrs: dict | None = None) -> Graph:
    """A graph computing `op` over inputs a0, a1, ... shaped like `arrays`."""
    inputs = [op_table.source("input", TensorType(DType.from_numpy(a.dtype), a.shape), name=f"a{i}")
              for i, a in enumerate(arrays)]
    return Graph(op, (("out", op_table.apply(op, inputs, attrs or {})),))


def run_graph(graph: Graph, arrays: list[np.ndarray]) -> np.ndarray:
    lowered = run_pipeline(graph, PipelineOptions(verify=True))
    feeds = {f"a{i}": a for i, a in enumerate(arrays)}
    return NumpyExecutor(lowered).run(feeds, {}, {})["out"]


def run_op(op: str, arrays: list[np.ndarray], attrs: dict | None = None) -> np.ndarray:
    """Run one op through the whole pipeline (decomposition included) on the numpy backend."""
    return run_graph(op_graph(op, arrays, attrs), arrays)
