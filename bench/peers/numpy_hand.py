"""The MLP's train step written by hand in numpy, the way a competent person would: forward,
the softmax-minus-one-hot backward, and PyTorch's Adam update in place over one flat buffer of
all parameters. Sensible, not tuned: no fused kernels, no thread tricks."""
from __future__ import annotations

import math

import numpy as np

from bench.peers import Runner
from bench.workloads import N_BATCHES, Workload

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8


class NumpyMLP(Runner):
    def __init__(self, w: Workload, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
        self.train = w.kind == "train"
        names = [f"{kind}{i}" for i in range(1, len(w.layers) + 1) for kind in "Wb"]
        # Every parameter and gradient is a view of one flat buffer, so Adam is a dozen numpy
        # calls per step rather than a dozen per parameter.
        self.flat = np.concatenate([params[n].ravel() for n in names]).astype(np.float32)
        self.grad_flat = np.zeros_like(self.flat)
        self.params, self.grads, offset = [], [], 0
        for n in names:
            size, shape = params[n].size, params[n].shape
            self.params.append(self.flat[offset:offset + size].reshape(shape))
            self.grads.append(self.grad_flat[offset:offset + size].reshape(shape))
            offset += size
        self.m, self.v = np.zeros_like(self.flat), np.zeros_like(self.flat)
        self.scratch = np.empty_like(self.flat)
        self.t = 0
        self.x, self.y = x, y
        self.rows = np.arange(w.batch)

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """The activations: the input, each hidden layer after relu, then the logits."""
        acts = [x]
        layers = len(self.params) // 2
        for i in range(layers):
            z = acts[-1] @ self.params[2 * i]
            z += self.params[2 * i + 1]
            if i < layers - 1:
                np.maximum(z, 0, out=z)
            acts.append(z)
        return acts

    def run(self, i: int):
        x, y = self.x[i % N_BATCHES], self.y[i % N_BATCHES]
        acts = self.forward(x)
        z = acts[-1]
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=1, keepdims=True)
        if not self.train:
            z -= np.log(total)
            return z                                   # log-probabilities
        loss = float((np.log(total[:, 0]).sum() - z[self.rows, y].sum()) / len(y))
        g = e / total                                  # d loss / d logits = (softmax - onehot) / B
        g[self.rows, y] -= 1.0
        g /= len(y)
        for layer in reversed(range(len(acts) - 1)):
            np.matmul(acts[layer].T, g, out=self.grads[2 * layer])
            g.sum(axis=0, out=self.grads[2 * layer + 1])
            if layer > 0:
                g = g @ self.params[2 * layer].T
                g *= acts[layer] > 0
        self.adam()
        return loss

    def adam(self) -> None:
        p, g, m, v, s = self.flat, self.grad_flat, self.m, self.v, self.scratch
        self.t += 1
        m *= BETA1
        np.multiply(g, 1 - BETA1, out=s)
        m += s
        v *= BETA2
        np.multiply(g, g, out=s)
        s *= 1 - BETA2
        v += s
        correction1, correction2 = 1 - BETA1 ** self.t, 1 - BETA2 ** self.t
        np.sqrt(v, out=s)
        s *= 1 / math.sqrt(correction2)          # python floats keep the arithmetic in float32
        s += EPS
        np.divide(m, s, out=s)
        s *= LR / correction1
        p -= s


def build(w: Workload, params, x, y, options) -> NumpyMLP:
    if w.key == "f":        # the worker reports the peer skipped, with this reason
        raise NotImplementedError("no hand-written numpy GPT (graphc numpy is the numpy line)")
    if w.convs:
        raise NotImplementedError("no convolutional network by hand (workload g)")
    return NumpyMLP(w, params, x, y)
