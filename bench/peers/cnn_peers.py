"""Workload (g), PyTorch's MNIST CNN, in the peers that run it: PyTorch (eager and
torch.compile) as examples/mnist/main.py writes the network, without dropout, and JAX with
`lax.conv_general_dilated` in one jitted train step (PyTorch's Adam, as jax_jit.py's MLP). The
torch and JAX peer modules hand (g) over to this one; numpy by hand has no CNN."""
from __future__ import annotations

import numpy as np

from bench.workloads import Workload


def torch_model(w: Workload, params: dict[str, np.ndarray]):
    """conv, relu, conv, relu, max-pool 2, flatten, linear, relu, linear: nn.Sequential with
    graphc's initial parameters (conv weights are [O, C, kh, kw] in both; graphc's W is [in, out])."""
    import torch
    from torch import nn
    layers: list = []
    for i, (c, o, k) in enumerate(w.convs, start=1):
        conv = nn.Conv2d(c, o, k)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(params[f"C{i}"]))
            conv.bias.copy_(torch.from_numpy(params[f"c{i}"]))
        layers += [conv, nn.ReLU()]
    layers += [nn.MaxPool2d(2), nn.Flatten()]
    for i, (k, n) in enumerate(w.layers, start=1):
        linear = nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(params[f"W{i}"].T.copy()))
            linear.bias.copy_(torch.from_numpy(params[f"b{i}"]))
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def build_jax(w: Workload, params, x, y):
    import jax
    import jax.numpy as jnp

    from bench.peers import jax_jit

    def log_probs(p, xb):
        convs, dense = p
        h = xb
        for cw, cb in convs:
            h = jax.lax.conv_general_dilated(h, cw, (1, 1), "VALID",
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"))
            h = jax.nn.relu(h + cb[None, :, None, None])
        n, c, hh, ww = h.shape
        h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5)).reshape(n, -1)
        for i, (dw, db) in enumerate(dense):
            h = h @ dw + db
            if i < len(dense) - 1:
                h = jax.nn.relu(h)
        return jax.nn.log_softmax(h, axis=1)

    convs = [(jnp.asarray(params[f"C{i}"]), jnp.asarray(params[f"c{i}"]))
             for i in range(1, len(w.convs) + 1)]
    dense = [(jnp.asarray(params[f"W{i}"]), jnp.asarray(params[f"b{i}"]))
             for i in range(1, len(w.layers) + 1)]
    return jax_jit.JaxRunner(w, params, x, y, model=((convs, dense), log_probs))
