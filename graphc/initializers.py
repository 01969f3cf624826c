"""Parameter initializers: their signatures (checked by the front end) and how they draw values.

Each parameter draws from its own stream, seeded by the run's seed and the parameter's name, so
adding a parameter never changes how the others start.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Initializer:
    name: str
    options: dict          # option -> default (None: derived, or required when listed in `required`)
    required: tuple[str, ...]
    draw: Callable[..., np.ndarray]
    doc: str


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
    Initializer("kaiming", {"fan_in": None}, (),
                lambda shape, rng, fan_in: rng.normal(0.0, np.sqrt(2.0 / _fan_in(shape, fan_in)),
                                                      shape),
                "He: N(0, 2 / fan_in), for ReLU layers"),
    Initializer("xavier", {"fan_in": None, "fan_out": None}, (),
                lambda shape, rng, fan_in, fan_out: rng.normal(
                    0.0, np.sqrt(2.0 / (_fan_in(shape, fan_in) + _fan_out(shape, fan_out))), shape),
                "Glorot: N(0, 2 / (fan_in + fan_out)), for sigmoid and tanh layers"),
]}


def param_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def initialize(name: str, shape: tuple[int, ...], dtype: np.dtype, init: tuple, seed: int) -> np.ndarray:
    """Draw a parameter's starting value. `init` is the frozen spec kept in the IR: (name, options)."""
    init_name, options = init
    spec = INITIALIZERS[init_name]
    values = spec.draw(tuple(shape), param_rng(seed, name), **dict(options))
    return np.array(values, dtype=dtype, order="C")   # ascontiguousarray would make 0-d 1-d
