"""A compiled program: parameters (a live, checked mapping), the inputs it takes, and `forward`."""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from graphc.errors import did_you_mean, error
from graphc.ir.node import Graph
from graphc.ir.types import DType, TensorType, format_shape
from graphc.runtime.numpy_backend import BACKENDS


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: TensorType
    role: str              # weight | bias | other
    init: tuple            # (initializer, ((option, value), ...))

    @property
    def count(self) -> int:
        return self.type.size()


class ProgramError(ValueError):
    """A mistake in how a program is called from Python (wrong input, wrong parameter value)."""


class ParamStore(MutableMapping):
    """name -> ndarray. Assigning checks shape and dtype; the program uses the new value at once."""

    def __init__(self, infos: dict[str, ParamInfo], values: dict[str, np.ndarray]):
        self._infos, self._values = infos, values

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._values:
            raise KeyError(self._unknown(name))
        return self._values[name]

    def __setitem__(self, name: str, value) -> None:
        if name not in self._infos:
            raise KeyError(self._unknown(name))
        info = self._infos[name]
        array = np.asarray(value)
        want = info.type.dtype.numpy
        if array.shape != tuple(info.type.shape):
            raise ProgramError(f"parameter {name} is {info.type}; got an array of shape "
                               f"{format_shape(array.shape)}")
        if array.dtype.kind != want.kind:   # any float precision converts; ints or bools do not
            raise ProgramError(f"parameter {name} is {info.type}; got an array of dtype "
                               f"{array.dtype}")
        self._values[name] = np.ascontiguousarray(array, dtype=want)

    def __delitem__(self, name: str) -> None:
        raise ProgramError(f"parameters cannot be removed (tried {name})")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def _unknown(self, name: str) -> str:
        hint = did_you_mean(name, self._infos)
        return f"no parameter named {name!r}" + (f"; {hint}" if hint else "")

    def __repr__(self) -> str:
        return "ParamStore({" + ", ".join(f"{k!r}: {v.dtype}{list(v.shape)}"
                                          for k, v in self._values.items()) + "})"


class Program:
    """What `graphc.compile_file` returns and `graphc.runtime.load_artifact` restores."""

    def __init__(self, name: str, graphs: dict[str, Graph], params: dict[str, ParamInfo],
                 values: dict[str, np.ndarray], backend: str = "numpy", meta: dict | None = None):
        if backend not in BACKENDS:
            raise error(f"unknown backend '{backend}'",
                        hint=did_you_mean(backend, BACKENDS) or f"backends: {', '.join(BACKENDS)}")
        self.name, self.graphs, self.backend = name, graphs, backend
        self.param_info = params
        self.params = ParamStore(params, values)
        self.meta = dict(meta or {})
        self._executors = {key: BACKENDS[backend](g) for key, g in graphs.items()}
        forward = graphs["forward"]
        self.inputs: dict[str, TensorType] = {n.attr["name"]: n.type for n in forward.inputs}
        self.outputs: list[str] = [name for name, _ in forward.outputs]

    @property
    def graph(self) -> Graph:
        return self.graphs["forward"]

    def forward(self, **inputs) -> dict[str, np.ndarray]:
        feeds, dims = self._feeds(inputs)
        return self._executors["forward"].run(feeds, self.params._values, dims)

    def _feeds(self, inputs: dict) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        unknown = [k for k in inputs if k not in self.inputs]
        if unknown:
            hint = did_you_mean(unknown[0], self.inputs)
            raise ProgramError(f"{self.name} has no input {unknown[0]!r}" +
                               (f"; {hint}" if hint else f" (inputs: {', '.join(self.inputs)})"))
        missing = [k for k in self.inputs if k not in inputs]
        if missing:
            raise ProgramError(f"{self.name} needs input {missing[0]!r} ({self.inputs[missing[0]]})")
        dims: dict[str, int] = {}
        origin: dict[str, str] = {}
        feeds = {}
        for name, ttype in self.inputs.items():
            array = np.asarray(inputs[name])
            feeds[name] = _convert(name, array, ttype)
            if array.ndim != ttype.ndim:
                raise ProgramError(f"input {name} is {ttype}; got an array of shape "
                                   f"{format_shape(array.shape)} ({array.ndim} axes, not {ttype.ndim})")
            for axis, (want, got) in enumerate(zip(ttype.shape, array.shape)):
                if isinstance(want, str):
                    if want in dims and dims[want] != got:
                        raise ProgramError(f"input {name} is {ttype}; got shape "
                                           f"{format_shape(array.shape)}, but {want} is "
                                           f"{dims[want]} (from {origin[want]})")
                    dims.setdefault(want, got)
                    origin.setdefault(want, name)
                elif want != got:
                    raise ProgramError(f"input {name} is {ttype}; got shape "
                                       f"{format_shape(array.shape)} ({got} != {want} on axis {axis})")
        return feeds, dims

    def save(self, path) -> None:
        from graphc.runtime.artifact import save_artifact
        save_artifact(self, path)

    def __repr__(self) -> str:
        ins = ", ".join(f"{k}: {v}" for k, v in self.inputs.items())
        return f"<Program {self.name}({ins}) -> {', '.join(self.outputs)} on {self.backend}>"


def _convert(name: str, array: np.ndarray, ttype: TensorType) -> np.ndarray:
    want = ttype.dtype.numpy
    if array.dtype == want:
        return array
    ok = ((want.kind == "f" and array.dtype.kind in "fiub") or
          (want.kind in "iu" and array.dtype.kind in "iu") or
          (ttype.dtype is DType.bool and array.dtype.kind == "b"))
    if not ok:
        raise ProgramError(f"input {name} is {ttype}; got an array of dtype {array.dtype}")
    return array.astype(want)
