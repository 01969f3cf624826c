"""Data augmentation of training batches (the train block's `augment`), and a prefetcher that
prepares the next block of batches in a background thread while the compiled step runs.
What happens to a sample depends only on (seed, epoch, its position in the epoch's order): a
resumed run augments exactly as before, whatever the batch size.

The pixel work (resampling, noise) has two implementations with the same arithmetic: numpy here,
the reference, and native kernels (graphc/backends/llvm/image_kernels.py), free of the GIL, which
the Augmenter uses where llvmlite loads. docs/training.md ("Augmentation") has the measurements
behind the constants below."""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from graphc.backends.host import usable_cores
from graphc.images import crop_window, fit_problem

# Mixed into every augmentation seed so its streams never coincide with the minibatch order's
# (numpy's default_rng([seed, epoch])).
_STREAM = 0x6175676D          # "augm"
NORMALS = 1 << 20             # the size of a run's bank of noise
# The random choices of an epoch are drawn for this many positions at once, from their own
# generator, so that a draw's fixed cost is shared (and a resumed run draws the same choices).
CHUNK = 1024
# Chunks are drawn this many at a time (each from its own generator, so the choices are the
# same): the first draw after the compiled step runs with cold caches.
GROUP = 4


# --- geometric augmentations: one inverse affine map per image ----------------------------------
# A map takes an output pixel (row, col) to the source pixel it reads: (m00 row + m01 col + m02,
# m10 row + m11 col + m12). The augmentations draw a map per image as these six `Coefficients`,
# each an [n] array or one number for all the images: composing them is then a few operations on
# contiguous vectors, with no matrices built. The `*_maps` functions return the same maps as
# matrices [n, 3, 3] (bottom rows 0, 0, 1), which the resamplers also take.
# Maps that send integer pixels to integer pixels are `exact`: sampled by copying, not blending.

Coefficients = tuple          # (m00, m01, m02, m10, m11, m12)


def shifts(rows: np.ndarray, cols: np.ndarray) -> Coefficients:
    """Move image i by rows[i] down and cols[i] right (out[r, c] = in[r - dr, c - dc])."""
    return 1.0, 0.0, 0.0 - rows, 0.0, 1.0, 0.0 - cols      # (0.0 - 0 is +0.0, as -rows is)


def flips(flipped: np.ndarray, axis: int, size: int) -> Coefficients:
    """Mirror the images where `flipped` is true along `axis` (0 rows: vertical, 1 columns:
    horizontal) of length `size`."""
    scale, offset = np.where(flipped, -1.0, 1.0), np.where(flipped, float(size - 1), 0.0)
    return (scale, 0.0, offset, 0.0, 1.0, 0.0) if axis == 0 else (1.0, 0.0, 0.0, 0.0, scale, offset)


def rotations(degrees: np.ndarray, height: int, width: int) -> Coefficients:
    """Turn image i counterclockwise by degrees[i] (as displayed, rows downward) about its centre."""
    t = np.radians(degrees)
    cos, sin = np.cos(t), np.sin(t)
    cr, cc = (height - 1) / 2, (width - 1) / 2
    # source = R (out - centre) + centre, R the inverse (clockwise) rotation in (row, col)
    return cos, sin, cr - cos * cr - sin * cc, -sin, cos, cc + sin * cr - cos * cc


def crops(tops: np.ndarray, lefts: np.ndarray, window: tuple[int, int], pad: int, height: int,
          width: int) -> Coefficients:
    """Take the window [tops[i], lefts[i]] + `window` of image i padded by `pad` zeros on each
    side, stretched to height x width (a plain copy when the window has the image's size)."""
    # corner pixels onto the window's corner pixels, so that nothing beyond the window is read
    return ((window[0] - 1) / max(height - 1, 1), 0.0, (tops - pad).astype(np.float64),
            0.0, (window[1] - 1) / max(width - 1, 1), (lefts - pad).astype(np.float64))


def composed(first: Coefficients, second: Coefficients) -> Coefficients:
    """The map that applies `first`, then `second` (the matrix product first @ second)."""
    a0, a1, a2, b0, b1, b2 = first
    s00, s01, s02, s10, s11, s12 = second
    return (a0 * s00 + a1 * s10, a0 * s01 + a1 * s11, a0 * s02 + a1 * s12 + a2,
            b0 * s00 + b1 * s10, b0 * s01 + b1 * s11, b0 * s02 + b1 * s12 + b2)


def matrices(maps: Coefficients, n: int, rows: int = 3, dtype=np.float64) -> np.ndarray:
    """The maps of n images as matrices [n, 3, 3], or their first two rows [n, 2, 3] (rows=2)."""
    out = np.zeros((n, rows, 3), dtype)
    if rows == 3:
        out[:, 2, 2] = 1.0
    flat = out.reshape(n, 3 * rows)
    for k, value in enumerate(maps):
        flat[:, k] = value
    return out


def coefficients(maps: np.ndarray) -> Coefficients:
    """Matrices [n, 3, 3] (or their first two rows) as Coefficients."""
    return tuple(maps[:, i, k] for i in range(2) for k in range(3))


def then(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """`composed` for matrices [n, 3, 3]: first @ second."""
    return matrices(composed(coefficients(first), coefficients(second)), len(first))


def shift_maps(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`shifts` as matrices [n, 3, 3]."""
    return matrices(shifts(rows, cols), len(rows))


def flip_maps(flipped: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`flips` as matrices [n, 3, 3]."""
    return matrices(flips(flipped, axis, size), len(flipped))


def rotation_maps(degrees: np.ndarray, height: int, width: int) -> np.ndarray:
    """`rotations` as matrices [n, 3, 3]."""
    return matrices(rotations(degrees, height, width), len(degrees))


def crop_maps(tops: np.ndarray, lefts: np.ndarray, window: tuple[int, int], pad: int,
              height: int, width: int) -> np.ndarray:
    """`crops` as matrices [n, 3, 3]."""
    return matrices(crops(tops, lefts, window, pad, height, width), len(tops))


def resample(images: np.ndarray, maps: np.ndarray, exact: bool, noise: tuple | None = None,
             index: np.ndarray | None = None) -> np.ndarray:
    """out[i, :, r, c] = images[i, :, maps[i] @ (r, c, 1)], zero outside the image: nearest
    pixel when `exact` (the maps hit pixel centres), else bilinear. Vectorized over the batch.
    The maps are [n, 3, 3], or their first two rows [n, 2, 3]; the source coordinates are
    float32, clipped to [-1, size]. With `noise` = (normals, offsets, std), add_noise follows;
    with `index`, images[index] are resampled."""
    out = _resampled(images if index is None else images[index], maps, exact)
    return out if noise is None else add_noise(out, *noise)


def _resampled(images: np.ndarray, maps: np.ndarray, exact: bool) -> np.ndarray:
    n, channels, height, width = images.shape
    flat, row = bordered(images).reshape(-1), width + 3
    small = np.int32 if flat.size < 2**31 else np.intp   # int32 index arithmetic is faster
    # the first pixel of image i, channel k
    first = (np.arange(n * channels, dtype=small) * (row * (height + 3))).reshape(
        n, channels, 1, 1) + (row + 1)
    if exact and not maps[:, 0, 1].any() and not maps[:, 1, 0].any():
        # Shifts, flips and crops keep rows in rows: one index per row and per column.
        rows = _clipped(maps[:, 0, 0, None] * np.arange(height) + maps[:, 0, 2, None], height)
        cols = _clipped(maps[:, 1, 1, None] * np.arange(width) + maps[:, 1, 2, None], width)
        index = first + (rows * row)[:, None, :, None] + cols[:, None, None, :]
        return flat.take(index)
    src = (maps[:, :2].reshape(2 * n, 3).astype(np.float32) @ _grid(height, width))   # [2n, HW]
    src = src.reshape(n, 2, height * width)
    np.maximum(src, -1, out=src)
    np.minimum(src, np.array([[height], [width]], np.float32), out=src)
    corner = np.rint(src) if exact else np.floor(src)
    pixel = corner.astype(small)                # (casting floats to int64 is several times slower)
    index = (pixel[:, 0] * row + pixel[:, 1])[:, None, :] + first.reshape(n, channels, 1)
    index = index.astype(np.intp)
    if exact:
        return flat.take(index).reshape(images.shape)
    src -= corner                               # the fractions
    fraction = src.astype(images.dtype, copy=False)
    fr, fc = fraction[:, None, 0], fraction[:, None, 1]
    # the neighbours right, below and below right: the same indices into shifted views
    top, top_right = flat.take(index), flat[1:].take(index)
    bottom, bottom_right = flat[row:].take(index), flat[row + 1:].take(index)
    top_right -= top
    top_right *= fc
    top += top_right
    bottom_right -= bottom
    bottom_right *= fc
    bottom += bottom_right
    bottom -= top
    bottom *= fr
    top += bottom
    return top.reshape(images.shape)


def bordered(images: np.ndarray) -> np.ndarray:
    """The images [n, C, H, W] in a zero border, one pixel before and two after: a source pixel
    clipped into [-1, size] and its neighbour +1 both fall inside it, reading zeros beyond the
    image (both resamplers read this layout)."""
    n, channels, height, width = images.shape
    padded = np.zeros((n, channels, height + 3, width + 3), images.dtype)
    padded[:, :, 1:-2, 1:-2] = images
    return padded


def _clipped(coords: np.ndarray, size: int) -> np.ndarray:
    """Whole pixel coordinates as indices, those beyond the image onto the zero border."""
    return np.clip(np.rint(coords), -1, size).astype(np.intp)


_GRIDS: dict[tuple[int, int], np.ndarray] = {}


def _grid(height: int, width: int) -> np.ndarray:
    """Every pixel's (row, col, 1) as columns [3, H*W], computed once per image size."""
    if (height, width) not in _GRIDS:
        r, c = np.meshgrid(np.arange(height, dtype=np.float32),
                           np.arange(width, dtype=np.float32), indexing="ij")
        _GRIDS[height, width] = np.stack([r.reshape(-1), c.reshape(-1), np.ones(r.size, np.float32)])
    return _GRIDS[height, width]


# --- the table: name -> how one augmentation draws its randomness ----------------------------

@dataclass(frozen=True)
class Augmentation:
    """How one augmentation draws its random choices for `count` images of shape (C, H, W):
    draw(rng, count, image, options) -> an array with a row per image, or Coefficients."""
    draw: Callable
    # Geometric ones draw inverse affine maps (Coefficients), composed with their geometric
    # neighbours and sampled once; exact(image, options) says whether the maps hit pixel centres.
    exact: Callable | None = None
    # The others add noise: noise(rows, options, normals) -> add_noise's (normals, offsets, std).
    noise: Callable | None = None

    @property
    def geometric(self) -> bool:
        return self.exact is not None


def _shift(rng, n, image, o):
    p = o["pixels"]
    return shifts(rng.integers(-p, p + 1, n), rng.integers(-p, p + 1, n))


def _rotate(rng, n, image, o):
    return rotations(rng.uniform(-o["degrees"], o["degrees"], n), image[1], image[2])


def _flip(rng, n, image, o):
    axis = 1 if o["direction"] == "horizontal" else 0
    return flips(rng.random(n) < o["p"], axis, image[1 + axis])


def _crop(rng, n, image, o):
    window = crop_window(o["size"], image)
    pad, height, width = o["pad"], image[1], image[2]
    tops = rng.integers(0, height + 2 * pad - window[0] + 1, n)
    lefts = rng.integers(0, width + 2 * pad - window[1] + 1, n)
    return crops(tops, lefts, window, pad, height, width)


def _crop_exact(image, o) -> bool:
    return crop_window(o["size"], image) == tuple(image[1:])


def _noise_offsets(rng, n, image, o):
    # Each image reads its noise from a random window of the run's bank of normal numbers, drawn
    # once: fresh normals for every image would cost more than a small model's training step.
    return rng.integers(0, bank_size(image) - math.prod(image) + 1, n)


def bank_size(image: tuple[int, int, int]) -> int:
    """How many normal numbers the bank that noise reads holds, for images of shape `image`."""
    return max(NORMALS, 4 * math.prod(image))


def add_noise(x: np.ndarray, normals: np.ndarray, offsets: np.ndarray, std: float) -> np.ndarray:
    """x + std * normals[offsets[i]:offsets[i] + size] for each image i of x (size = x[i].size),
    the product in float32."""
    windows = np.lib.stride_tricks.sliding_window_view(normals, math.prod(x.shape[1:]))
    return x + (std * windows[offsets].reshape(x.shape)).astype(x.dtype, copy=False)


@dataclass(frozen=True)
class Kernels:
    """Where the pixel work runs: `resample(images, maps, exact, noise=None)` and
    `add_noise(x, normals, offsets, std)`, as defined above, for images of `dtypes` (None: any)
    whose planes with their border, (H + 3) * (W + 3), have fewer than `pixels` elements."""
    resample: Callable
    add_noise: Callable
    dtypes: tuple | None = None
    pixels: int | None = None

    def take(self, images: np.ndarray) -> bool:
        """Whether they take `images` [N, C, H, W]."""
        height, width = images.shape[2:]
        return ((self.dtypes is None or images.dtype in self.dtypes) and
                (self.pixels is None or (height + 3) * (width + 3) < self.pixels))


NUMPY = Kernels(resample, add_noise)


def native_kernels() -> Kernels | None:
    """The native kernels, or None where llvmlite does not load (then numpy does the work)."""
    try:
        from graphc.backends.llvm import image_kernels
    except ImportError:
        return None
    return Kernels(image_kernels.resample, image_kernels.add_noise, image_kernels.DTYPES,
                   image_kernels.PIXELS)


AUGMENTATIONS = {
    "shift": Augmentation(_shift, exact=lambda image, o: True),
    "rotate": Augmentation(_rotate, exact=lambda image, o: False),
    "flip": Augmentation(_flip, exact=lambda image, o: True),
    "noise": Augmentation(_noise_offsets,
                          noise=lambda offsets, o, normals: (normals, offsets, o["std"])),
    "crop": Augmentation(_crop, exact=_crop_exact),
}


@dataclass(frozen=True)
class _Stage:
    """What one pass over the pixels does: consecutive geometric augmentations, their maps
    composed (`exact`: the product hits pixel centres), or one that adds noise."""
    ops: tuple[tuple[Augmentation, dict], ...]
    geometric: bool
    exact: bool


def _stages(augment: list[tuple[str, dict]], image: tuple[int, int, int]) -> list[_Stage]:
    stages: list[_Stage] = []
    for name, options in augment:
        op = AUGMENTATIONS[name]
        last = stages[-1] if stages else None
        if op.geometric and last is not None and last.geometric:
            stages[-1] = _Stage(last.ops + ((op, options),), True,
                                last.exact and op.exact(image, options))
        else:
            stages.append(_Stage(((op, options),), op.geometric,
                                 op.geometric and op.exact(image, options)))
    return stages


class Augmenter:
    """The train block's augmentations, in order, for images of shape `image`: consecutive
    geometric ones are composed into one affine map per image and sampled once (so no pixels are
    lost between them and interpolation blurs once); noise right after them is added in the same
    pass.

    The random choices for the sample at position p of an epoch's order come from the generator
    of its chunk, default_rng([seed, epoch, p // CHUNK, tag]), which draws each augmentation's
    choices for the whole chunk in turn: they do not depend on the batch size, and no generator
    state is carried from batch to batch."""

    def __init__(self, augment: list, image: tuple[int, int, int], seed: int,
                 kernels: Kernels | None = None):
        self.augment = [(name, dict(options)) for name, options in augment]
        self.image, self.seed = tuple(image), seed
        self.kernels = kernels or native_kernels() or NUMPY
        for name, options in self.augment:
            if name not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {name!r}")
            problem = fit_problem(name, options, self.image)
            if problem:
                raise ValueError(problem[1])
        self.stages = _stages(self.augment, self.image)
        # The bank of standard normal numbers that noise reads, drawn once from the seed.
        self.normals = np.random.default_rng([seed, _STREAM]).standard_normal(
            bank_size(self.image), dtype=np.float32) if any(
            not s.geometric for s in self.stages) else None
        # A batch reads one chunk's choices, or two: the last two groups drawn are kept.
        self._chunks: dict[tuple[int, int], list[np.ndarray]] = {}
        self._chunks_lock = threading.Lock()

    def _draw_chunk(self, epoch: int, chunk: int) -> list[np.ndarray]:
        """Each stage's random choices for positions chunk * CHUNK ..< (chunk + 1) * CHUNK of
        epoch `epoch`: maps as their first two rows in float32 [CHUNK, 2, 3], noise offsets."""
        rng = np.random.default_rng([self.seed, epoch, chunk, _STREAM])
        values = []
        for stage in self.stages:
            drawn = None
            for op, options in stage.ops:
                new = op.draw(rng, CHUNK, self.image, options)
                drawn = new if drawn is None else composed(drawn, new)
            values.append(matrices(drawn, CHUNK, rows=2, dtype=np.float32)
                          if stage.geometric else drawn)
        return values

    def _chunk(self, epoch: int, chunk: int) -> list[np.ndarray]:
        """_draw_chunk(epoch, chunk), drawn with the GROUP - 1 chunks after it where missing."""
        with self._chunks_lock:
            if (epoch, chunk) not in self._chunks:
                for k in range(chunk, chunk + GROUP):
                    if (epoch, k) not in self._chunks:
                        if len(self._chunks) == 2 * GROUP:
                            del self._chunks[next(iter(self._chunks))]     # the oldest
                        self._chunks[epoch, k] = self._draw_chunk(epoch, k)
            return self._chunks[epoch, chunk]

    def draws(self, epoch: int, start: int, count: int) -> list[np.ndarray]:
        """Each stage's random choices for positions start ..< start + count of epoch `epoch`."""
        first, last = start // CHUNK, (start + max(count, 1) - 1) // CHUNK
        chunks = [self._chunk(epoch, k) for k in range(first, last + 1)]
        at = start - first * CHUNK
        if len(chunks) == 1:
            return [v[at:at + count] for v in chunks[0]]
        return [np.concatenate(parts)[at:at + count] for parts in zip(*chunks)]

    def __call__(self, x: np.ndarray, epoch: int, start: int,
                 index: np.ndarray | None = None) -> np.ndarray:
        """x[index] (x itself without `index`): the samples at positions start ..< start + n of
        epoch `epoch`'s order, augmented; a pure function of the samples, the seed, the epoch
        and the positions. The first resampling reads the samples where they lie in x."""
        images = x.reshape(len(x), *self.image)
        n = len(images) if index is None else len(index)
        kernels = self.kernels
        if not kernels.take(images):
            kernels = NUMPY
        values, stages = self.draws(epoch, start, n), self.stages
        if index is not None and not (stages and stages[0].geometric):
            images, index = images[index], None
        k = 0
        while k < len(stages):
            if stages[k].geometric:
                noise = None
                if k + 1 < len(stages) and not stages[k + 1].geometric:   # in the same pass
                    noise = self._noise(stages[k + 1], values[k + 1])
                images = kernels.resample(images, values[k], stages[k].exact, noise, index)
                index, k = None, k + (1 if noise is None else 2)
            else:
                images = kernels.add_noise(images, *self._noise(stages[k], values[k]))
                k += 1
        return images.reshape(n, *x.shape[1:])

    def _noise(self, stage: _Stage, rows: np.ndarray) -> tuple:
        (op, options), = stage.ops
        return op.noise(rows, options, self.normals)


# Training batches augmented per call, sharing the call's fixed cost (right after the compiled
# step the Python around the kernel runs with cold caches); larger blocks gain little and hold
# more memory.
BLOCK = 16
# Whether the train loop augments a block ahead in a background thread; None: where the process
# may use more than two cores. On two, the compiled step's BLAS threads already use both, and a
# third thread contends with them.
AHEAD: bool | None = None


def ahead() -> bool:
    """Whether to augment ahead in a background thread (see AHEAD)."""
    return usable_cores() > 2 if AHEAD is None else AHEAD


def prefetch(make: Callable[[int], object], count: int) -> Iterator:
    """make(0), ..., make(count - 1), each prepared in a background thread while the consumer
    works on the one before (numpy and the compiled steps release the GIL in their heavy work)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="graphc-prefetch") as pool:
        ahead = pool.submit(make, 0) if count else None
        for k in range(count):
            item = ahead.result()
            if k + 1 < count:
                ahead = pool.submit(make, k + 1)
            yield item
