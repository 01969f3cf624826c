"""Fine-tune an imported PyTorch MNIST CNN one epoch in graphc, and the same network one epoch in
PyTorch, from the same starting weights; print both test accuracies (docs/onnx.md quotes them).

    python -m bench.onnx_finetune [--data-dir ../shared/data/mnist] [--out DIR]

1. PyTorch's examples/mnist network (seed 1) is pre-trained one pass over the first 12,000
   training images (Adam, lr 1e-3, batch 64) and exported with torch.onnx.export (dynamo=False,
   eval mode, so its dropout is not in the file);
2. `graphc import model.onnx -o DIR --loss nll --data mnist`, then `graphc train DIR/... --epochs 1
   --lr 1e-4 --batch 64 --seed 1`: one epoch over the train block's training split (48,000 of the
   60,000 images; 12,000 held out for validation), then `graphc eval RUN --split test`;
3. PyTorch fine-tunes the same starting weights one epoch over 48,000 images (dropout on, as the
   network is written), Adam lr 1e-4, batch 64, and is scored on the same 10,000 test images.
Both scale pixels to [0, 1] (graphc's `scale = unit`).
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main() -> None:
    import torch
    F = torch.nn.functional
    sys.path.insert(0, str(ROOT / "tests"))
    from test_onnx_import import MnistCNN  # the same network the tests import

    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--out", default="/tmp/graphc-onnx-finetune")
    args = ap.parse_args()
    data, out = Path(args.data_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = idx(data / "train-images-idx3-ubyte.gz").astype(np.float32)[:, None] / 255
    y = idx(data / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xt = idx(data / "t10k-images-idx3-ubyte.gz").astype(np.float32)[:, None] / 255
    yt = idx(data / "t10k-labels-idx1-ubyte.gz").astype(np.int64)

    def test_score(model):
        model.eval()
        with torch.no_grad():
            logp = torch.cat([model(torch.from_numpy(xt[i:i + 1000])) for i in range(0, 10000, 1000)])
        return float(F.nll_loss(logp, torch.from_numpy(yt))), float(
            (logp.argmax(1).numpy() == yt).mean())

    def epoch(model, xs, ys, lr, seed):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        order = np.random.default_rng(seed).permutation(len(xs))
        model.train()
        for i in range(0, len(xs), 64):
            b = order[i:i + 64]
            opt.zero_grad()
            F.nll_loss(model(torch.from_numpy(xs[b])), torch.from_numpy(ys[b])).backward()
            opt.step()

    torch.manual_seed(1)
    model = MnistCNN()
    epoch(model, x[:12000], y[:12000], 1e-3, 0)
    start = test_score(model)
    onnx_path = out / "mnist_cnn.onnx"
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(xt[:2]),), str(onnx_path), dynamo=False,
                          input_names=["x"], output_names=["out"],
                          dynamic_axes={"x": {0: "batch"}, "out": {0: "batch"}})
    state = {k: v.clone() for k, v in model.state_dict().items()}

    graphc = [sys.executable, "-m", "graphc"]
    subprocess.run(graphc + ["import", str(onnx_path), "-o", str(out / "imported"), "--loss", "nll",
                             "--data", "mnist"], check=True)
    run = out / "run"
    t0 = time.perf_counter()
    subprocess.run(graphc + ["train", str(out / "imported" / "mnist_cnn.nn"), "--data-dir", str(data),
                             "--epochs", "1", "--lr", "1e-4", "--batch", "64", "--seed", "1",
                             "--out", str(run), "--quiet"], check=True)
    graphc_seconds = time.perf_counter() - t0
    scored = subprocess.run(graphc + ["eval", str(run), "--split", "test", "--data-dir", str(data)],
                            check=True, capture_output=True, text=True).stdout
    numbers = dict(re.findall(r"(loss|accuracy)\W+([0-9.]+)", scored))

    model.load_state_dict(state)
    t0 = time.perf_counter()
    split = np.random.default_rng(1).permutation(60000)[:48000]
    epoch(model, x[split], y[split], 1e-4, 1)
    torch_seconds = time.perf_counter() - t0
    tuned = test_score(model)
    print(json.dumps({
        "pretrained": {"test_loss": round(start[0], 4), "test_accuracy": round(start[1], 4)},
        "graphc": {"test_loss": float(numbers.get("loss", "nan")),
                   "test_accuracy": float(numbers.get("accuracy", "nan")) / 100,
                   "seconds": round(graphc_seconds, 1), "eval_output": scored.strip()},
        "pytorch": {"test_loss": round(tuned[0], 4), "test_accuracy": round(tuned[1], 4),
                    "seconds": round(torch_seconds, 1)}}, indent=2))


if __name__ == "__main__":
    main()
