"""What augmentation costs an epoch: the same 12,800 MNIST training samples (200 batches of 64)
through the train loop without augmentation and with `augment = [shift(2), rotate(10),
noise(0.1)]`, both inline and a block ahead in a background thread, interleaved round by round
on the llvm backend, for each model named (default: mnist_cnn and mnist_mlp).

    python bench/augment_overhead.py [ROUNDS] [MODEL ...]    (MNIST in ../shared/data/mnist)

Each round times the three one after another; a ratio is the median over rounds of each round's
augmented time over its plain one (rounds a second apart share the machine's state, which drifts
by tens of percent on a shared machine). The train loop's own choice between the two ways is
`augment.ahead()`: a thread where the process may use more than two cores."""
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import graphc
from graphc.runtime import augment
from graphc.runtime.train import Trainer, TrainSettings, prepare_data

REPO = Path(__file__).resolve().parents[1]
AUG = (("shift", {"pixels": 2}), ("rotate", {"degrees": 10.0}), ("noise", {"std": 0.1}))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 11
print(f"augment.ahead() here: {augment.ahead()}", flush=True)
for model in sys.argv[2:] or ["mnist_cnn", "mnist_mlp"]:
    program = graphc.compile_file(REPO / "models" / f"{model}.nn", backend="llvm")
    plain = TrainSettings.of(program)
    data = prepare_data(program, plain, data_dir=str(REPO.parent / "shared" / "data" / "mnist"))
    x, y = data.splits["train"]
    x, y = x[:12800], y[:12800]
    ways = {"plain": (plain, None), "inline": (replace(plain, augment=AUG), False),
            "thread": (replace(plain, augment=AUG), True)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds + 1):               # the first round warms up and is not counted
        for name, (settings, ahead) in ways.items():
            augment.AHEAD = ahead
            times[name].append(Trainer(program, settings, data).train_epoch(x, y)["seconds"])
    augment.AHEAD = None
    for name in ("inline", "thread"):
        ratio = statistics.median(a / p for a, p in zip(times[name][1:], times["plain"][1:]))
        print(f"{model} {name}: plain median {statistics.median(times['plain'][1:]):.3f} s, "
              f"augmented {statistics.median(times[name][1:]):.3f} s; median ratio {ratio:.3f}",
              flush=True)
