"""Parameter initializers: their signatures (checked by the front end) and how they draw values.

Each parameter draws from its own stream, seeded by the run's seed and the parameter's name, so
adding a parameter never changes how the others start.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from graphc.files import MAX_DATA_BYTES, Npz, error


@dataclass(frozen=True)
class Initializer:
    name: str
    options: dict          # option -> default (None: derived, or required when listed in `required`)
    required: tuple[str, ...]
    draw: Callable[..., np.ndarray]
    doc: str
    choices: dict = field(default_factory=dict)   # option -> the words it takes (mode=fan_out)
    strings: tuple[str, ...] = ()                 # options that take a string (npz's file, key)


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """fan_in, fan_out. 2-D weights are [in, out] (graphc writes x @ W); 3-D and up follow
    PyTorch's convolution layout [out, in, k...]; vectors count their length both ways."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[2:]))
    return shape[1] * receptive, shape[0] * receptive


def _fan_in(shape, fan_in):
    return fan_in if fan_in is not None else fans(shape)[0]


def _fan_out(shape, fan_out):
    return fan_out if fan_out is not None else fans(shape)[1]


INITIALIZERS: dict[str, Initializer] = {i.name: i for i in [
    Initializer("zeros", {}, (), lambda shape, rng: np.zeros(shape), "all zeros"),
    Initializer("ones", {}, (), lambda shape, rng: np.ones(shape), "all ones"),
    Initializer("constant", {"value": None}, ("value",),
                lambda shape, rng, value: np.full(shape, value), "every element set to value"),
    Initializer("normal", {"mean": 0.0, "std": 1.0}, (),
                lambda shape, rng, mean, std: rng.normal(mean, std, shape), "N(mean, std^2)"),
    Initializer("uniform", {"low": 0.0, "high": 1.0}, (),
                lambda shape, rng, low, high: rng.uniform(low, high, shape), "U(low, high)"),
    Initializer("kaiming", {"fan_in": None, "mode": "fan_in", "dist": "normal", "fan_out": None}, (),
                lambda shape, rng, fan_in, mode="fan_in", dist="normal", fan_out=None: _draw(
                    rng, shape, dist, 2.0 / (_fan_in(shape, fan_in) if mode == "fan_in"
                                             else _fan_out(shape, fan_out))),
                "He: variance 2 / fan (fan_in, or fan_out with mode=fan_out), normal or uniform; "
                "for ReLU layers", {"mode": ("fan_in", "fan_out"), "dist": ("normal", "uniform")}),
    Initializer("xavier", {"fan_in": None, "fan_out": None, "dist": "normal"}, (),
                lambda shape, rng, fan_in, fan_out, dist="normal": _draw(
                    rng, shape, dist, 2.0 / (_fan_in(shape, fan_in) + _fan_out(shape, fan_out))),
                "Glorot: variance 2 / (fan_in + fan_out), normal or uniform; for sigmoid and tanh "
                "layers", {"dist": ("normal", "uniform")}),
    Initializer("orthogonal", {"gain": 1.0}, (), lambda shape, rng, gain: _orthogonal(shape, rng, gain),
                "gain times a (semi-)orthogonal matrix, as PyTorch's orthogonal_ (axes after the "
                "first flattened)"),
    # Drawn by `initialize` itself, which knows the .nn file's folder, the name and the dtype.
    Initializer("npz", {"file": None, "key": None}, ("file",), lambda shape, rng, file, key: None,
                "the array `key` (default: the parameter's name) of the .npz file `file`, a path "
                "relative to the .nn file's folder that stays inside it; shape and dtype must be "
                "the parameter's", strings=("file", "key")),
]}

MAX_NPZ_FILE_BYTES = 16 * 2**30    # an .npz of parameters: the model's parameter limit


def npz_path_problem(file: str) -> str | None:
    """Why `file` may not name an npz initializer's archive (None when it may): a relative path
    ending in .npz, without `..`, so it stays inside the .nn file's folder."""
    parts = PurePosixPath(file.replace("\\", "/")).parts
    if not file.endswith(".npz"):
        return "the file must be an .npz archive (its name ending in .npz)"
    if file.startswith(("/", "\\")) or (len(file) > 1 and file[1] == ":") or ".." in parts:
        return "the file must be a path relative to the .nn file's folder, without '..'"
    return None


def read_npz_param(folder: Path, file: str, key: str, shape: tuple, dtype) -> np.ndarray:
    """The array `key` of `folder/file`, which must be `dtype[shape]`; read without pickles, its
    size bounded, the path confined to `folder` (a link out of it is refused too)."""
    problem = npz_path_problem(file)
    if problem:
        raise error(f"npz(\"{file}\"): {problem}")
    base = Path(folder).resolve()
    path = (base / file).resolve()
    if not path.is_relative_to(base):
        raise error(f"npz(\"{file}\"): the file leads outside the .nn file's folder {base}")
    with Npz(None, path, MAX_NPZ_FILE_BYTES, "the parameter archive") as archive:
        return archive.read(key, MAX_DATA_BYTES, np.dtype(dtype), tuple(shape),
                            f"npz(\"{file}\"): array '{key}'")



def _draw(rng: np.random.Generator, shape, dist: str, variance: float) -> np.ndarray:
    """Zero-mean draws of a variance: N(0, v), or U(-b, b) with b = sqrt(3 v)."""
    if dist == "uniform":
        bound = np.sqrt(3.0 * variance)
        return rng.uniform(-bound, bound, shape)
    return rng.normal(0.0, np.sqrt(variance), shape)


def _orthogonal(shape, rng: np.random.Generator, gain: float) -> np.ndarray:
    if len(shape) < 2:
        raise ValueError("orthogonal() needs a parameter of two or more axes")
    rows, cols = shape[0], int(np.prod(shape[1:]))
    a = rng.normal(0.0, 1.0, (max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))          # a uniform (Haar) draw, not QR's sign convention
    if rows < cols:
        q = q.T
    return gain * q.reshape(shape)


def param_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def initialize(name: str, shape: tuple[int, ...], dtype: np.dtype, init: tuple, seed: int,
               folder: Path | None = None) -> np.ndarray:
    """Draw a parameter's starting value. `init` is the frozen spec kept in the IR: (name, options);
    `folder` is the .nn file's, where `npz` reads its archive (a GraphcError when it cannot)."""
    init_name, options = init
    if init_name == "npz":
        options = dict(options)
        return read_npz_param(Path(folder or "."), options["file"], options["key"] or name, shape,
                              dtype)
    spec = INITIALIZERS[init_name]
    values = spec.draw(tuple(shape), param_rng(seed, name), **dict(options))
    return np.array(values, dtype=dtype, order="C")   # ascontiguousarray would make 0-d 1-d
