"""Workload (f), the GPT, in PyTorch (eager and torch.compile) and JAX (jit), as people write it:
layer norm, causal scaled-dot-product attention over 4 heads, a GELU MLP, the output layer tied to
the embedding, cross-entropy over every position, gradients clipped to norm 1 and AdamW (β₂ 0.999,
weight decay 0.1 on the matrices and tables: graphc's `weight` role), starting from graphc's
parameters. torch.compile compiles the loss (forward and backward) and the optimizer's step."""
from __future__ import annotations

import math
import os

import numpy as np

from bench.gpt import CONTEXT, HEADS, LAYERS, VOCAB, WIDTH, block_prefix
from bench.peers import Runner
from bench.workloads import N_BATCHES, Workload

LR, BETA1, BETA2, EPS, DECAY, CLIP = 1e-3, 0.9, 0.999, 1e-8, 0.1, 1.0


def _decayed(name: str) -> bool:
    return name == "E" or name.endswith(".P") or ".W" in name


class TorchGPT(Runner):
    def __init__(self, params, x, y, options, compiled: bool):
        import torch
        import torch.nn.functional as F
        self.torch = torch
        torch.set_num_threads(int(options.get("threads", torch.get_num_threads())))
        self.p = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
        self.xs = [torch.from_numpy(x[i]) for i in range(N_BATCHES)]
        self.ys = [torch.from_numpy(y[i]) for i in range(N_BATCHES)]
        p = self.p

        def ln(h, prefix):
            return F.layer_norm(h, (WIDTH,), p[f"{prefix}.gamma"], p[f"{prefix}.beta"], 1e-5)

        def loss_fn(xb, yb):
            n = xb.shape[0]
            h = p["E"][xb] + p["h.P"]
            for i in range(1, LAYERS + 1):
                pre = block_prefix(i)
                a = ln(h, f"{pre}.attend.layernorm")
                q, k, v = ((a @ p[f"{pre}.attend.multihead_attention.W{s}"])
                           .view(n, CONTEXT, HEADS, WIDTH // HEADS).transpose(1, 2) for s in "qkv")
                att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                merged = att.transpose(1, 2).reshape(n, CONTEXT, WIDTH)
                h = h + merged @ p[f"{pre}.attend.multihead_attention.Wo"]
                a = ln(h, f"{pre}.mlp.layernorm")
                h = h + F.gelu(a @ p[f"{pre}.mlp.linear.W"]) @ p[f"{pre}.mlp.linear_2.W"]
            logits = ln(h, "h_2.layernorm") @ p["E"].T
            return F.cross_entropy(logits.view(-1, VOCAB), yb.view(-1))

        groups = [{"params": [v for k, v in p.items() if _decayed(k)], "weight_decay": DECAY},
                  {"params": [v for k, v in p.items() if not _decayed(k)], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=(BETA1, BETA2), eps=EPS)
        self.loss_fn, self.opt_step, self.compiled = loss_fn, self.optimizer.step, compiled
        if compiled:
            self.loss_fn = torch.compile(loss_fn)
            self.opt_step = torch.compile(self.optimizer.step)

    def run(self, i: int):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.xs[i % N_BATCHES], self.ys[i % N_BATCHES])
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.p.values(), CLIP)
        self.opt_step()
        return loss.detach()

    def value(self, result) -> np.ndarray:
        return result.numpy()

    def details(self) -> dict:
        return {"threads": self.torch.get_num_threads(), "torch": self.torch.__version__,
                "compiled": self.compiled}


class JaxGPT(Runner):
    """The whole step (loss, gradients, clipping, AdamW) in one jax.jit, parameters and moments
    donated. Token ids are int32: JAX runs without 64-bit types unless told otherwise."""

    def __init__(self, params, x, y):
        import jax
        import jax.numpy as jnp
        self.jax = jax

        def ln(h, g, b):
            mean = h.mean(-1, keepdims=True)
            var = ((h - mean) ** 2).mean(-1, keepdims=True)
            return (h - mean) / jnp.sqrt(var + 1e-5) * g + b

        def loss_fn(p, xb, yb):
            n = xb.shape[0]
            h = p["E"][xb] + p["h.P"]
            mask = jnp.tril(jnp.ones((CONTEXT, CONTEXT), bool))
            for i in range(1, LAYERS + 1):
                pre = block_prefix(i)
                a = ln(h, p[f"{pre}.attend.layernorm.gamma"], p[f"{pre}.attend.layernorm.beta"])
                q, k, v = ((a @ p[f"{pre}.attend.multihead_attention.W{s}"])
                           .reshape(n, CONTEXT, HEADS, WIDTH // HEADS).transpose(0, 2, 1, 3) for s in "qkv")
                s = jnp.where(mask, q @ k.transpose(0, 1, 3, 2) / math.sqrt(WIDTH // HEADS), -jnp.inf)
                att = jax.nn.softmax(s, axis=-1) @ v
                merged = att.transpose(0, 2, 1, 3).reshape(n, CONTEXT, WIDTH)
                h = h + merged @ p[f"{pre}.attend.multihead_attention.Wo"]
                a = ln(h, p[f"{pre}.mlp.layernorm.gamma"], p[f"{pre}.mlp.layernorm.beta"])
                hidden = jax.nn.gelu(a @ p[f"{pre}.mlp.linear.W"], approximate=False)
                h = h + hidden @ p[f"{pre}.mlp.linear_2.W"]
            logits = ln(h, p["h_2.layernorm.gamma"], p["h_2.layernorm.beta"]) @ p["E"].T
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, yb[..., None], axis=-1))

        def step(state, xb, yb):
            p, m, v, t = state
            loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
            norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
            scale = jnp.minimum(1.0, CLIP / (norm + 1e-6))
            g = jax.tree.map(lambda x: x * scale, g)
            t = t + 1
            c1, c2 = 1 - BETA1 ** t, 1 - BETA2 ** t
            m = jax.tree.map(lambda m, g: BETA1 * m + (1 - BETA1) * g, m, g)
            v = jax.tree.map(lambda v, g: BETA2 * v + (1 - BETA2) * g * g, v, g)
            p = {k: (p[k] * (1 - LR * DECAY) if _decayed(k) else p[k])
                 - (LR / c1) * m[k] / (jnp.sqrt(v[k]) / jnp.sqrt(c2) + EPS) for k in p}
            return (p, m, v, t), loss

        self.step = jax.jit(step, donate_argnums=(0,))
        p = {k: jnp.asarray(v) for k, v in params.items()}
        zeros = jax.tree.map(jnp.zeros_like, p)
        self.state = (p, zeros, jax.tree.map(jnp.zeros_like, p), jnp.float32(0))
        self.xs = [jax.device_put(x[i].astype(np.int32)) for i in range(N_BATCHES)]
        self.ys = [jax.device_put(y[i].astype(np.int32)) for i in range(N_BATCHES)]

    def run(self, i: int):
        self.state, loss = self.step(self.state, self.xs[i % N_BATCHES], self.ys[i % N_BATCHES])
        return loss

    def sync(self, result) -> None:
        self.jax.block_until_ready((result, self.state))

    def details(self) -> dict:
        return {"jax": self.jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def build_torch(w: Workload, params, x, y, options, compiled: bool) -> TorchGPT:
    return TorchGPT(params, x, y, options, compiled)


def build_jax(w: Workload, params, x, y, options) -> JaxGPT:
    return JaxGPT(params, x, y)
