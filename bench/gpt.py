"""Workload (f): the character-level GPT of models/shakespeare_gpt.nn (bench/models/gpt.nn), one
AdamW train step at batch 12, context 64. Its shared inputs (token ids, not images) and the matrix
products of its step, for the floor; the peers that run it are in bench/peers/gpt_peers.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB, CONTEXT, WIDTH, HEADS, LAYERS = 65, 64, 128, 4, 4


def block_prefix(i: int) -> str:
    """graphc's parameter scope of block i (1-based) of bench/models/gpt.nn."""
    return "h_2.block" + ("" if i == 1 else f"_{i}")


def matmul_shapes(batch: int, train: bool) -> list[tuple[int, int, int, str]]:
    """The two-dimensional products of a step: the projections, the MLP, the tied output layer and
    the embedding (as one_hot @ E), with their weight and input gradients in training. The
    attention's own batched products (scores and weighted values, about 8% of the multiply-adds)
    are left out: the floor is a lower bound."""
    rows = batch * CONTEXT
    layers = [(WIDTH, WIDTH)] * 4 + [(WIDTH, 4 * WIDTH), (4 * WIDTH, WIDTH)]
    shapes = []
    for _ in range(LAYERS):
        for k, n in layers:
            shapes.append((rows, k, n, "nn"))
            if train:
                shapes += [(k, rows, n, "tn"), (rows, n, k, "nt")]
    shapes.append((rows, WIDTH, VOCAB, "nt"))               # logits = h @ E^T
    shapes.append((rows, VOCAB, WIDTH, "nn"))               # embedding: one_hot(x) @ E
    if train:
        shapes += [(VOCAB, rows, WIDTH, "tn"), (rows, VOCAB, WIDTH, "nn"),   # the output layer's
                   (VOCAB, rows, WIDTH, "tn")]                                # and the embedding's
    return shapes


def prepare(w, folder: Path, models_dir: Path, n_batches: int, seed: int, check_steps: int) -> Path:
    """As workloads.prepare: graphc's initial parameters, token-id batches (`x`, `y`: [n_batches,
    B, 64] int64, `y` the characters after `x`'s) and graphc numpy's first losses."""
    import graphc

    program = graphc.compile_file(models_dir / w.nn_file, backend="numpy")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(n_batches, w.batch, CONTEXT + 1), dtype=np.int64)
    x, y = ids[..., :-1].copy(), ids[..., 1:].copy()
    arrays = {f"param:{name}": np.array(value) for name, value in program.params.items()}
    check = [program.train_step(x=x[i % n_batches], y=y[i % n_batches]) for i in range(check_steps)]
    path = folder / f"{w.key}.npz"
    np.savez(path, x=x, y=y, check=np.asarray(check, dtype=np.float64), **arrays)
    return path
