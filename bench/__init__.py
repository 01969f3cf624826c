"""bench: graphc against its peers (a hand-written numpy step, PyTorch eager, torch.compile, JAX
jit) on the same workloads, side by side in one run. `python -m bench --help` tells how to run it;
README.md's "Benchmarks" section says what it measures."""
