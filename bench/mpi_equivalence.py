"""One epoch of a model at global batch 64, on one process and on 2 MPI ranks through the command
line, and how far apart their parameters end: float32 summation order, nothing else, is the
claim (docs/distributed.md). The model's dropout is taken out first: each rank draws its own
masks, so a model with dropout matches only in distribution.

    python bench/mpi_equivalence.py [MODEL.nn] [--data-dir DIR] [--backend llvm] [--ranks 2]

Defaults: models/mnist_mlp.nn on ../shared/data/mnist. Needs pip install -e '.[mpi]'.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(REPO / "models" / "mnist_mlp.nn"))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--backend", default="llvm")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    text = Path(args.model).read_text()
    # `-> dropout(p)` in a chain, or `h = dropout(h, p=...)`: both become the identity
    plain = re.sub(r"\s*->\s*dropout\([^)]*\)", "", text)
    plain = re.sub(r"dropout\((\w+)(, [^)]*)?\)", r"\1", plain)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / Path(args.model).name
        model.write_text(plain)
        runs = {}
        for ranks in (1, args.ranks):
            out = Path(tmp) / f"ranks{ranks}"
            command = [sys.executable, "-m", "graphc", "train", str(model), "--epochs", "1",
                       "--batch", str(args.batch), "--data-dir", args.data_dir, "--quiet",
                       "--backend", args.backend, "--out", str(out), "--ranks", str(ranks)]
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
            if proc.returncode:
                sys.exit(f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}")
            print(f"{ranks} rank{'s' if ranks > 1 else ''}: {proc.stdout.strip()} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            with np.load(out / "checkpoints" / "final.npz", allow_pickle=False) as z:
                runs[ranks] = {k: z[k] for k in z.files if k.startswith("param/")}
        one, many = runs[1], runs[args.ranks]
        for name in sorted(one):
            diff = np.abs(one[name].astype(np.float64) - many[name])
            scale = float(np.abs(one[name]).max())
            print(f"  {name}: max |difference| {diff.max():.3g} (largest |value| {scale:.3g}; "
                  f"{diff.max() / np.spacing(np.float32(scale)):.1f} ulp of it)")


if __name__ == "__main__":
    main()
