"""JAX: the whole train step (loss, `value_and_grad`, PyTorch's Adam update) in one `jax.jit`,
with the parameters and Adam's moments donated so that XLA updates them in place. Labels are
int32: JAX runs without 64-bit types unless told otherwise."""
from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bench.peers import Runner
from bench.workloads import N_BATCHES, Workload

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8


def _log_probs(params, x):
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return jax.nn.log_softmax(h, axis=1)


def _loss(params, x, y, log_probs=_log_probs):
    return -jnp.mean(jnp.take_along_axis(log_probs(params, x), y[:, None], axis=1))


@partial(jax.jit, donate_argnums=(0,), static_argnums=(3,))
def _train_step(state, x, y, log_probs=_log_probs):
    params, m, v, t = state
    loss, grads = jax.value_and_grad(partial(_loss, log_probs=log_probs))(params, x, y)
    t = t + 1
    correction1, correction2 = 1 - BETA1 ** t, 1 - BETA2 ** t
    m = jax.tree.map(lambda m, g: BETA1 * m + (1 - BETA1) * g, m, grads)
    v = jax.tree.map(lambda v, g: BETA2 * v + (1 - BETA2) * g * g, v, grads)
    params = jax.tree.map(
        lambda p, m, v: p - (LR / correction1) * m / (jnp.sqrt(v) / jnp.sqrt(correction2) + EPS),
        params, m, v)
    return (params, m, v, t), loss


_forward = jax.jit(_log_probs)


class JaxRunner(Runner):
    def __init__(self, w: Workload, params, x, y, model=None):
        """`model`: (initial parameters, log_probs function) of another network than the MLP
        (cnn_peers.py: workload (g))."""
        self.train = w.kind == "train"
        self.log_probs, self.forward = _log_probs, _forward
        if model is not None:
            layers, self.log_probs = model
            self.forward = jax.jit(self.log_probs)
        else:
            layers = [(jnp.asarray(params[f"W{i}"]), jnp.asarray(params[f"b{i}"]))
                      for i in range(1, len(w.layers) + 1)]
        zeros = jax.tree.map(jnp.zeros_like, layers)
        self.state = (layers, zeros, jax.tree.map(jnp.zeros_like, layers), jnp.float32(0))
        self.xs = [jax.device_put(x[i]) for i in range(N_BATCHES)]
        self.ys = [jax.device_put(y[i].astype(np.int32)) for i in range(N_BATCHES)]

    def run(self, i: int):
        xb, yb = self.xs[i % N_BATCHES], self.ys[i % N_BATCHES]
        if not self.train:
            return self.forward(self.state[0], xb)
        self.state, loss = _train_step(self.state, xb, yb, self.log_probs)
        return loss

    def sync(self, result) -> None:
        jax.block_until_ready((result, self.state))

    def details(self) -> dict:
        return {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
                "xla_flags": os.environ.get("XLA_FLAGS", "")}


def build(w: Workload, params, x, y, options) -> JaxRunner:
    if w.key == "f":        # the GPT (bench/peers/gpt_peers.py)
        from bench.peers.gpt_peers import build_jax
        return build_jax(w, params, x, y, options)
    if w.convs:
        from bench.peers.cnn_peers import build_jax
        return build_jax(w, params, x, y)
    return JaxRunner(w, params, x, y)
