"""Score nanoGPT checkpoints the way graphc scores its GPT runs, so the two can be compared on one
measure (docs/training.md, "The GPT on Tiny Shakespeare", quotes the results):

    python bench/nanogpt_val.py NANOGPT_DIR CKPT.pt [CKPT.pt ...]

NANOGPT_DIR is a checkout of https://github.com/karpathy/nanoGPT whose `data/shakespeare_char`
was prepared (`prepare.py` with `input.txt` copied from ../shared/data/tinyshakespeare) and
trained with its README's CPU command, for example

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

(its seed is fixed at 1337 in train.py). nanoGPT prints an estimate of the validation loss
(`eval_iters` random batches, noisy); this prints each checkpoint's loss over the whole validation
split in consecutive non-overlapping windows of the block size, the mean cross-entropy over every
position, which is what `graphc train` prints last for a model trained by steps ("val: loss ...
over the whole validation split"). Needs torch (the `test` extra).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def whole_val_loss(nanogpt: Path, checkpoint: Path, chunk: int = 256) -> tuple[int, float]:
    import torch
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's model.py
    # A checkpoint written by train.py holds tensors and plain values only.
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    ids = np.fromfile(nanogpt / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16).astype(np.int64)
    t = ckpt["model_args"]["block_size"]
    count = (len(ids) - 1) // t
    offsets = np.arange(count)[:, None] * t + np.arange(t)
    x, y = torch.from_numpy(ids[offsets]), torch.from_numpy(ids[offsets + 1])
    total = 0.0
    with torch.no_grad():
        for i in range(0, count, chunk):
            logits, _ = model(x[i:i + chunk], y[i:i + chunk])
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y[i:i + chunk].reshape(-1), reduction="sum").item()
    return ckpt["iter_num"], total / (count * t)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 1
    import torch
    torch.set_num_threads(1)
    nanogpt = Path(argv[0])
    for checkpoint in argv[1:]:
        step, loss = whole_val_loss(nanogpt, Path(checkpoint))
        print(f"{checkpoint}: step {step}, loss {loss:.4f} over the whole validation split")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
