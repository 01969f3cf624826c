"""Write examples/mnist_x8.npy: the first 8 MNIST test images as float32 [8, 784] in [0, 1].

Run from the repository root: python examples/make_mnist_sample.py [../shared/data/mnist]
"""
import gzip
import struct
import sys
from pathlib import Path

import numpy as np

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mnist")
with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "rb") as f:
    header = f.read(16)
    magic, count, rows, cols = struct.unpack(">iiii", header)
    assert magic == 2051, f"not an IDX image file (magic {magic})"
    pixels = np.frombuffer(f.read(8 * rows * cols), dtype=np.uint8)
images = (pixels.reshape(8, rows * cols) / 255.0).astype(np.float32)
np.save(Path(__file__).with_name("mnist_x8.npy"), images)
print(f"wrote {images.shape} {images.dtype}")
