"""Native kernels for data augmentation (runtime/augment.py): resampling a batch of images through
one affine map per image, with the noise that follows it added in the same pass, and noise alone.
Each call releases the GIL and reads the batch's samples where they lie in the training set. The
module (image_ir.py) is compiled like every other: for the host CPU, cached on disk."""
from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

from graphc.backends.llvm import jit
from graphc.backends.llvm.image_ir import LANES, PIXELS, module_text

_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
DTYPES = tuple(_TYPES)            # the image types the kernels take

_RESAMPLE = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 8, ctypes.c_float,
                             *[ctypes.c_int64] * 4, ctypes.c_void_p)
_NOISE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int64)


@functools.cache
def _function(name: str, prototype):
    """The compiled function `name` (the whole module is compiled, or read from the cache, on
    the first call)."""
    return prototype(_compiled().address(name))


@functools.cache
def _compiled() -> jit.Compiled:
    text = module_text()
    return jit.Compiled(jit.object_code(text, lambda: text))


@functools.cache
def _grid(height: int, width: int) -> tuple[np.ndarray, int]:
    """[2, stride]: every pixel's row, then every pixel's column, as float32, each row padded
    with zeros to a multiple of LANES; and its address."""
    stride = -(-height * width // LANES) * LANES
    grid = np.zeros((2, stride), np.float32)
    rows, cols = np.divmod(np.arange(height * width), width)
    grid[0, :height * width], grid[1, :height * width] = rows, cols
    return grid, grid.ctypes.data


_THREAD = threading.local()


def _scratch(height: int, width: int, dtype: np.dtype) -> tuple[int, int]:
    """The addresses of this thread's buffers for images of height x width: the scratch plane,
    zeros, of which the kernels write only the interior (and zeros), so that the border stays
    zero from call to call; and the coordinates pass's indices and fractions."""
    buffers = _THREAD.__dict__.setdefault("buffers", {})
    key = (height, width, dtype)
    if key not in buffers:
        stride = -(-height * width // LANES) * LANES
        plane = np.zeros((height + 3) * (width + 3), dtype)
        coords = np.zeros(stride * (4 + 2 * dtype.itemsize), np.uint8)
        buffers[key] = (plane, coords), (plane.ctypes.data, coords.ctypes.data)
    return buffers[key][1]


def _plan(kind: str, height: int, width: int, dtype: np.dtype) -> tuple:
    """(the resampling function `kind`, the addresses of the pixel grid and of this thread's
    scratch plane and coordinates buffer) for images of height x width of `dtype`: one lookup
    per call (in the train loop, right after the compiled step, every Python and numpy
    operation runs with cold caches and costs several microseconds)."""
    plans = _THREAD.__dict__.setdefault("plans", {})
    key = (kind, height, width, dtype)
    if key not in plans:
        fn = _function(f"graphc_resample_{kind}_{_TYPES[dtype]}", _RESAMPLE)
        plans[key] = (fn, _grid(height, width)[1], *_scratch(height, width, dtype))
    return plans[key]


def resample(images: np.ndarray, maps: np.ndarray, exact: bool, noise: tuple | None = None,
             index: np.ndarray | None = None) -> np.ndarray:
    """augment.resample, natively: images [N, C, H, W] (float32 or float64), maps [n, 3, 3] or
    [n, 2, 3]; with `noise` = (normals, offsets, std), augment.add_noise of the result, in the
    same pass; with `index`, of images[index] (read where they lie: no gathered copy)."""
    _, channels, height, width = images.shape
    assert (height + 3) * (width + 3) < PIXELS, "a plane's pixels are indexed by float32 integers"
    if not images.flags.c_contiguous:
        images, index = np.ascontiguousarray(images if index is None else images[index]), None
    if index is None:
        index = np.arange(len(images), dtype=np.int64)
    index = np.ascontiguousarray(index, dtype=np.int64)
    # (as unsigned, negative indices are huge: one reduction checks both bounds)
    assert not len(index) or index.view(np.uint64).max() < len(images)
    n = len(index)
    shape, size = (n, channels, height, width), channels * height * width
    rows = np.ascontiguousarray(maps[:, :2], dtype=np.float32)
    assert rows.shape == (n, 2, 3)
    # LANES - 1 spare elements: the last run of pixels writes past the last plane
    out = np.empty(n * size + LANES - 1, images.dtype)
    kind, normals, offsets, std = "nearest" if exact else "bilinear", None, None, 0.0
    if noise is not None:
        normals, offsets, std = noise
        offsets, kind = _checked_offsets(offsets, normals, n, size), kind + "_noise"
    fn, grid, scratch, coords = _plan(kind, height, width, images.dtype)
    fn(images.ctypes.data, index.ctypes.data, out.ctypes.data, rows.ctypes.data, grid, scratch,
       None if noise is None else normals.ctypes.data,
       None if noise is None else offsets.ctypes.data, std, n, channels, height, width, coords)
    return out[:n * size].reshape(shape)


def add_noise(x: np.ndarray, normals: np.ndarray, offsets: np.ndarray, std: float) -> np.ndarray:
    """x + std * normals[offsets[i]:offsets[i] + size] for each image i of x (a new array)."""
    x = np.ascontiguousarray(x)
    n, size = len(x), x[0].size if len(x) else 0
    offsets = _checked_offsets(offsets, normals, n, size)
    out = np.empty_like(x)
    fn = _function(f"graphc_add_noise_{_TYPES[x.dtype]}", _NOISE)
    fn(x.ctypes.data, out.ctypes.data, normals.ctypes.data, offsets.ctypes.data, std, n, size)
    return out


def _checked_offsets(offsets: np.ndarray, normals: np.ndarray, n: int, size: int) -> np.ndarray:
    """The noise windows' offsets as int64, each window normals[offset:offset + size] inside the
    bank (the kernels read through bare addresses)."""
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    assert normals.dtype == np.float32 and normals.flags.c_contiguous
    assert len(offsets) == n and (not n or offsets.view(np.uint64).max() <= len(normals) - size)
    return offsets
