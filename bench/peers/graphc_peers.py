"""graphc: the workload's `.nn` file in bench/models/, compiled with `graphc.compile_file` for a
backend, its parameters set to the shared initial values, driven through `Program.train_step`
and `Program.forward` exactly as a user would."""
from __future__ import annotations

import graphc
from bench.peers import Runner
from bench.workloads import MODELS_DIR, N_BATCHES, Workload


class GraphcRunner(Runner):
    def __init__(self, w: Workload, params, x, y, backend: str):
        self.program = graphc.compile_file(MODELS_DIR / w.nn_file, backend=backend)
        for name, value in params.items():
            self.program.params[name] = value
        self.train = w.kind == "train"
        self.x, self.y = x, y

    def run(self, i: int):
        if self.train:
            return self.program.train_step(x=self.x[i % N_BATCHES], y=self.y[i % N_BATCHES])
        return self.program.forward(x=self.x[i % N_BATCHES])["logp"]

    def details(self) -> dict:
        return {"graphc": graphc.__version__, "backend": self.program.backend}


def build_numpy(w: Workload, params, x, y, options) -> GraphcRunner:
    return GraphcRunner(w, params, x, y, "numpy")


def build_llvm(w: Workload, params, x, y, options) -> GraphcRunner:
    return GraphcRunner(w, params, x, y, "llvm")
