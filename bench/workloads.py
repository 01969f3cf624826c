"""The workloads: what each one trains or runs, the matrix products of its step (for the
GEMM-bound floor), and the shared inputs every peer starts from (graphc's initial parameters and
the same random batches), with graphc numpy's results on them as the correctness reference."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
MODELS_DIR = BENCH_DIR / "models"
DATA_SEED = 1234
N_BATCHES = 4           # a small pool of batches, cycled, so no step sees the exact same input twice
CHECK_STEPS = 3         # training: the losses of the first three steps are compared with graphc numpy


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    sizes: tuple[int, ...]      # layer widths, input first: (784, 256, 10)
    batch: int
    kind: str                   # "train": one Adam step; "infer": one forward pass
    nn_file: str                # in bench/models/
    convs: tuple = ()           # (in, out, kernel) of each 3x3 convolution before a 2x2 max-pool (g)
    image: tuple = ()           # the input [C, H, W] of a convolutional net (g); else sizes[0]

    @property
    def layers(self) -> list[tuple[int, int]]:
        return list(zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def unit(self) -> str:
        return "step" if self.kind == "train" else "call"


WORKLOADS = {w.key: w for w in [
    Workload("a", "(a) MNIST MLP 784-256-10, batch 64, Adam: train step", (784, 256, 10), 64,
             "train", "mnist_mlp.nn"),
    Workload("b", "(b) MLP 784-1024-1024-10, batch 256, Adam: train step", (784, 1024, 1024, 10), 256,
             "train", "wide_mlp.nn"),
    Workload("c", "(c) the course's Net 10-20-2, batch 64, Adam: train step", (10, 20, 2), 64,
             "train", "tiny_net.nn"),
    Workload("d1", "(d) inference, (a)'s forward at batch 1", (784, 256, 10), 1, "infer", "mnist_mlp.nn"),
    Workload("d64", "(d) inference, (a)'s forward at batch 64", (784, 256, 10), 64, "infer",
             "mnist_mlp.nn"),
    # (f): a character-level GPT (bench/gpt.py): token ids in, not images; its own inputs and shapes
    Workload("f", "(f) char GPT 4x128, 4 heads, context 64, batch 12, AdamW: train step", (65, 128, 65),
             12, "train", "gpt.nn"),
    # (g): PyTorch's MNIST CNN; sizes are its dense layers, after the convolutions and the pool
    Workload("g", "(g) MNIST CNN (PyTorch's example, no dropout), batch 64, Adam: train step",
             (9216, 128, 10), 64, "train", "mnist_cnn.nn", ((1, 32, 3), (32, 64, 3)), (1, 28, 28)),
    Workload("g1", "(g) inference, the MNIST CNN's forward at batch 1", (9216, 128, 10), 1, "infer",
             "mnist_cnn.nn", ((1, 32, 3), (32, 64, 3)), (1, 28, 28)),
]}


def select(keys: str) -> list[Workload]:
    """`a,b,c,d,e` -> workloads; `d` means both batch sizes; `e` (compile times) is not one."""
    chosen = []
    for key in (k.strip() for k in keys.split(",") if k.strip()):
        if key == "e":
            continue
        if key == "d":
            chosen += [WORKLOADS["d1"], WORKLOADS["d64"]]
        elif key == "g":        # the CNN's train step and its batch-1 inference
            chosen += [WORKLOADS["g"], WORKLOADS["g1"]]
        elif key in WORKLOADS:
            chosen.append(WORKLOADS[key])
        else:
            raise ValueError(f"unknown workload {key!r}: choose from a, b, c, d, e, f")
    return chosen


def matmul_shapes(w: Workload) -> list[tuple[int, int, int, str]]:
    """(M, K, N, layout) of every matrix product a step needs: the forward product of each layer,
    and in training the weight gradient (x.T @ g) and, past the first layer, the input gradient
    (g @ W.T). Layouts: "nn", "tn" (left operand transposed), "nt" (right operand transposed)."""
    if w.key == "f":
        from bench import gpt
        return gpt.matmul_shapes(w.batch, w.kind == "train")
    if w.convs:
        return _conv_matmul_shapes(w)
    shapes = [(w.batch, k, n, "nn") for k, n in w.layers]
    if w.kind == "train":
        for i, (k, n) in enumerate(w.layers):
            shapes.append((k, w.batch, n, "tn"))
            if i > 0:
                shapes.append((w.batch, n, k, "nt"))
    return shapes


def _conv_matmul_shapes(w: Workload) -> list[tuple[int, int, int, str]]:
    """(g): each convolution as the GEMM of its im2col formulation, W [O, C*k*k] @ columns
    [C*k*k, N*OH*OW], its weight gradient (G @ columns.T) and, past the first, its input
    gradient (W.T @ G); then the dense layers, every one with its input gradient."""
    shapes, size = [], w.image[1]
    for i, (c, o, k) in enumerate(w.convs):
        size -= k - 1
        pixels = w.batch * size * size
        shapes.append((o, c * k * k, pixels, "nn"))
        if w.kind == "train":
            shapes.append((o, pixels, c * k * k, "nt"))
            if i > 0:
                shapes.append((c * k * k, o, pixels, "tn"))
    shapes += [(w.batch, k, n, "nn") for k, n in w.layers]
    if w.kind == "train":
        for k, n in w.layers:
            shapes += [(k, w.batch, n, "tn"), (w.batch, n, k, "nt")]
    return shapes


def matmul_flops(w: Workload) -> int:
    return sum(2 * m * k * n for m, k, n, _ in matmul_shapes(w))


def prepare(w: Workload, folder: Path) -> Path:
    """Write `folder/<key>.npz`: graphc's initial parameters (`param:W1`, ...), the batches (`x`:
    [N_BATCHES, B, in] float32 in [0, 1), `y`: [N_BATCHES, B] int64) and the reference (`check`):
    graphc numpy's first losses (training) or its first output (inference)."""
    import graphc

    if w.key == "f":
        from bench import gpt
        return gpt.prepare(w, folder, MODELS_DIR, N_BATCHES, DATA_SEED, CHECK_STEPS)
    program = graphc.compile_file(MODELS_DIR / w.nn_file, backend="numpy")
    rng = np.random.default_rng(DATA_SEED)
    x = rng.random((N_BATCHES, w.batch) + (w.image or (w.sizes[0],)), dtype=np.float32)
    y = rng.integers(0, w.sizes[-1], size=(N_BATCHES, w.batch), dtype=np.int64)
    arrays = {f"param:{name}": np.array(value) for name, value in program.params.items()}
    if w.kind == "train":
        check = [program.train_step(x=x[i % N_BATCHES], y=y[i % N_BATCHES]) for i in range(CHECK_STEPS)]
    else:
        check = program.forward(x=x[0])["logp"].ravel()
    path = folder / f"{w.key}.npz"
    np.savez(path, x=x, y=y, check=np.asarray(check, dtype=np.float64), **arrays)
    return path


def load(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(params, x, y, check) as `prepare` wrote them."""
    with np.load(path, allow_pickle=False) as f:
        params = {k.split(":", 1)[1]: f[k] for k in f.files if k.startswith("param:")}
        return params, f["x"], f["y"], f["check"]


def check_ok(got: list[float], want: np.ndarray) -> tuple[bool, float]:
    """Whether a peer's check values match graphc numpy's, and the largest difference. The
    tolerance is loose (float32 sums in other orders, Adam's first step dividing small gradients
    by their own size) but far below any difference in what is computed."""
    got_a = np.asarray(got, dtype=np.float64)
    if got_a.shape != want.shape or not np.all(np.isfinite(got_a)):
        return False, float("inf")
    diff = np.abs(got_a - want)
    return bool(np.all(diff <= 1e-4 + 1e-3 * np.abs(want))), float(diff.max(initial=0.0))
