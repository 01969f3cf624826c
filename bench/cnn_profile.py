"""PyTorch eager's train step of workload (g), PyTorch's MNIST CNN without dropout, op by op
(torch.profiler): where oneDNN's convolutions spend their time, beside `graphc time
bench/models/mnist_cnn.nn --backend llvm` for graphc's kernels (docs/backends.md,
"Convolutions").

    python bench/cnn_profile.py [--steps 20] [--threads 2]

Prints the median step time over 40 unprofiled steps, then the profiler's table of the next
`--steps` steps (self CPU time; divide by the steps for a step's share).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.nll_loss(F.log_softmax(model(x), dim=1), y).backward()
        optimizer.step()
    for _ in range(10):
        step()
    times = []
    for _ in range(40):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(f"PyTorch eager train step: median {np.median(times) * 1e3:.1f} ms, "
          f"min {min(times) * 1e3:.1f} ms ({args.threads} threads)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(f"{args.steps} profiled steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
