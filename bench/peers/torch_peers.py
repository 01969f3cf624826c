"""PyTorch, as people write it: an `nn.Sequential` of `nn.Linear` and `nn.ReLU`, `log_softmax`,
`nll_loss` and `torch.optim.Adam` with its defaults. `torch.compile` compiles the loss (forward
and, through AOTAutograd, backward) and the optimizer's step, as PyTorch's tutorials show."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.peers import Runner
from bench.workloads import N_BATCHES, Workload


def _model(w: Workload, params: dict[str, np.ndarray]) -> nn.Sequential:
    if w.convs:                 # (g): the MNIST CNN
        from bench.peers.cnn_peers import torch_model
        return torch_model(w, params)
    layers: list[nn.Module] = []
    for i, (k, n) in enumerate(w.layers, start=1):
        linear = nn.Linear(k, n)
        with torch.no_grad():   # graphc's W is [in, out]; nn.Linear keeps [out, in]
            linear.weight.copy_(torch.from_numpy(params[f"W{i}"].T.copy()))
            linear.bias.copy_(torch.from_numpy(params[f"b{i}"]))
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class TorchRunner(Runner):
    def __init__(self, w: Workload, params, x, y, options, compiled: bool):
        torch.set_num_threads(int(options.get("threads", torch.get_num_threads())))
        self.train = w.kind == "train"
        self.model = _model(w, params)
        self.xs = [torch.from_numpy(x[i]) for i in range(N_BATCHES)]
        self.ys = [torch.from_numpy(y[i]) for i in range(N_BATCHES)]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.compiled = compiled

        def loss_fn(xb, yb):
            return F.nll_loss(F.log_softmax(self.model(xb), dim=1), yb)

        def forward_fn(xb):
            return F.log_softmax(self.model(xb), dim=1)

        self.loss_fn, self.forward_fn, self.opt_step = loss_fn, forward_fn, self.optimizer.step
        if compiled:
            self.loss_fn = torch.compile(loss_fn)
            self.forward_fn = torch.compile(forward_fn)
            self.opt_step = torch.compile(self.optimizer.step)
        if not self.train:
            self.model.eval()
            self.model.requires_grad_(False)

    def run(self, i: int):
        xb, yb = self.xs[i % N_BATCHES], self.ys[i % N_BATCHES]
        if not self.train:
            with torch.inference_mode():
                return self.forward_fn(xb)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(xb, yb)
        loss.backward()
        self.opt_step()
        return loss.detach()

    def value(self, result) -> np.ndarray:
        return result.numpy()

    def details(self) -> dict:
        config = torch.__config__.show()
        blas = next((part.split("=", 1)[1] for line in config.splitlines()
                     for part in line.replace(",", " ").split() if part.startswith("BLAS_INFO=")), None)
        return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                "blas": blas, "torch": torch.__version__, "compiled": self.compiled}


def build_eager(w: Workload, params, x, y, options) -> TorchRunner:
    if w.key == "f":        # the GPT (bench/peers/gpt_peers.py)
        from bench.peers.gpt_peers import build_torch
        return build_torch(w, params, x, y, options, compiled=False)
    return TorchRunner(w, params, x, y, options, compiled=False)


def build_compiled(w: Workload, params, x, y, options) -> TorchRunner:
    if w.key == "f":
        from bench.peers.gpt_peers import build_torch
        return build_torch(w, params, x, y, options, compiled=True)
    return TorchRunner(w, params, x, y, options, compiled=True)
