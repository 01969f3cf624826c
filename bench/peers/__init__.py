"""The peers: one entry per implementation being timed, naming the module that builds it (imported
only inside a worker process, so the harness itself never imports torch or jax) and its thread
knob. Every peer module has `build(workload, params, x, y, options) -> Runner`."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PeerSpec:
    name: str
    label: str
    module: str             # bench.peers.<module>
    factory: str            # the build function in it
    knob: str | None        # which thread setting it takes: "blas", "torch", "xla" or None


PEERS = {p.name: p for p in [
    PeerSpec("floor", "matmul floor", "floor", "build", "blas"),
    PeerSpec("numpy_hand", "numpy by hand", "numpy_hand", "build", None),
    PeerSpec("torch_eager", "PyTorch eager", "torch_peers", "build_eager", "torch"),
    PeerSpec("torch_compile", "torch.compile", "torch_peers", "build_compiled", "torch"),
    PeerSpec("jax_jit", "JAX jit", "jax_jit", "build", "xla"),
    PeerSpec("graphc_numpy", "graphc numpy", "graphc_peers", "build_numpy", None),
    PeerSpec("graphc_llvm", "graphc llvm", "graphc_peers", "build_llvm", None),
]}
REFERENCE = "torch_eager"     # every line's ratio "vs torch eager"
THREAD_CHOICES = ("1", "all")  # what the calibration compares for each knob


def select(names: str) -> list[PeerSpec]:
    """`all` or a comma list of peer names -> specs, in PEERS' order; the floor is always in."""
    if names == "all":
        return list(PEERS.values())
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(sorted(unknown))}: choose from {', '.join(PEERS)}")
    return [p for p in PEERS.values() if p.name in wanted or p.name == "floor"]


def thread_setup(knob: str | None, threads: str | None) -> tuple[dict[str, str], dict]:
    """(environment variables for the worker, options for build) that give a peer `threads`
    ("1" or "all"; None leaves the library's default)."""
    if knob is None or threads is None:
        return {}, {}
    if knob == "blas":
        if threads == "1":
            return {v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}, {}
        return {}, {}
    if knob == "xla":
        # jax 0.10 ignores XLA_FLAGS' thread options (measured: --xla_cpu_multi_thread_eigen=false
        # intra_op_parallelism_threads=1 still uses both cores), so "1" pins the worker to one core.
        return {}, ({"cpus": 1} if threads == "1" else {})
    assert knob == "torch", f"internal error: unknown thread knob {knob}"
    return {}, {"threads": 1 if threads == "1" else os.cpu_count() or 1}


class Runner:
    """What a peer builds for one workload. `run(i)` takes one train step (or one forward pass)
    on batch `i % N_BATCHES` and returns the loss (or the output) in the peer's own type."""

    def run(self, i: int):
        raise NotImplementedError

    def sync(self, result) -> None:
        """Wait for any asynchronous work behind `result` (JAX dispatches asynchronously)."""

    def value(self, result) -> np.ndarray:
        """`result` as a numpy array, for the correctness check."""
        return np.asarray(result)

    def details(self) -> dict:
        """Anything worth recording about how the peer ran (threads, libraries)."""
        return {}
