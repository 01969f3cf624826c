"""What augmentation costs an epoch: the same 12,800 MNIST training samples (200 batches of 64)
through the train loop with and without `augment = [shift(2), rotate(10), noise(0.1)]`,
interleaved, on the llvm backend, for each model named (default: mnist_cnn and mnist_mlp).

    python bench/augment_overhead.py [ROUNDS] [MODEL ...]    (MNIST in ../shared/data/mnist)

Augmentation runs a batch ahead in a thread; the ratio is how much of it the step hides."""
import sys
from dataclasses import replace
from pathlib import Path

import graphc
from graphc.runtime.train import Trainer, TrainSettings, prepare_data

REPO = Path(__file__).resolve().parents[1]
AUG = (("shift", {"pixels": 2}), ("rotate", {"degrees": 10.0}), ("noise", {"std": 0.1}))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
for model in sys.argv[2:] or ["mnist_cnn", "mnist_mlp"]:
    program = graphc.compile_file(REPO / "models" / f"{model}.nn", backend="llvm")
    plain = TrainSettings.of(program)
    data = prepare_data(program, plain, data_dir=str(REPO.parent / "shared" / "data" / "mnist"))
    x, y = data.splits["train"]
    x, y = x[:12800], y[:12800]
    times = {"plain": [], "augment": []}
    for _ in range(rounds):
        for name, settings in (("plain", plain), ("augment", replace(plain, augment=AUG))):
            row = Trainer(program, settings, data).train_epoch(x, y)
            times[name].append(row["seconds"])
    best = min(times["augment"]) / min(times["plain"])
    median = sorted(times["augment"])[rounds // 2] / sorted(times["plain"])[rounds // 2]
    print(f"{model}: plain {[round(t, 2) for t in times['plain']]} s, augment "
          f"{[round(t, 2) for t in times['augment']]} s; ratio of medians {median:.3f}, "
          f"of best {best:.3f}", flush=True)
