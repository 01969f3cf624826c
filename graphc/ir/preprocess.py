"""Input preprocessing as graph nodes: the train block's scaling, fitted on the training split,
prepended to a graph's feature input, so that the graph takes raw data as the data set stores it.
The record says what raw input the model expects (dtype, the range seen in training)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphc.ir import ops as op_table
from graphc.ir.contract import ParamInfo
from graphc.ir.node import Graph, Node
from graphc.ir.types import TensorType

SCALINGS = ("none", "unit", "standardize")
CONSTANT_ROLE = "constant"      # a parameter no train step updates: the scaling's statistics


def _range(value) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not (low <= high or (math.isnan(low) and math.isnan(high))):
        raise ValueError(f"range {low}..{high} is empty")
    return low, high


@dataclass(frozen=True, eq=False)
class Preprocessing:
    """Scaling of input `input`: `(x - low) / (high - low)` for "unit", `(x - mean) / std` per
    feature for "standardize" (the statistics are constant parameters `input#mean`, `input#std`),
    nothing for "none". The raw values are converted to the input's dtype as they are fed, as
    in training (the IR has no byte type for raw images)."""

    input: str
    mode: str
    raw_dtype: str                          # the data set's numpy dtype ("uint8", "float64")
    raw_range: tuple[float, float]          # min and max of the raw training features
    scaled_range: tuple[float, float]       # the same after scaling (what the model saw)
    low: float = 0.0                        # unit
    high: float = 1.0
    mean: np.ndarray | None = None          # standardize: per feature of a flattened sample
    std: np.ndarray | None = None

    def __post_init__(self):
        if self.mode not in SCALINGS:
            raise ValueError(f"unknown scaling {self.mode!r}")
        if self.mode == "standardize" and (self.mean is None or self.std is None
                                           or np.shape(self.mean) != np.shape(self.std)
                                           or np.ndim(self.mean) != 1):
            raise ValueError("standardize needs a mean and a std of one length")

    @property
    def param_names(self) -> tuple[str, str]:
        return f"{self.input}#mean", f"{self.input}#std"

    def params(self, input_type: TensorType) -> dict[str, tuple[ParamInfo, np.ndarray]]:
        """The constant parameters the scaling reads: name -> (info, value) for "standardize",
        shaped like one sample of `input_type`."""
        if self.mode != "standardize":
            return {}
        sample = tuple(input_type.shape[1:])
        if math.prod(sample) != len(self.mean):
            raise ValueError(f"the scaling was fitted on samples of {len(self.mean)} values; input "
                             f"{self.input} is {input_type}")
        dtype = input_type.dtype.numpy
        ptype = TensorType(input_type.dtype, sample)
        return {name: (ParamInfo(name, ptype, CONSTANT_ROLE, ("zeros", ())),
                       np.asarray(value, dtype=np.float64).astype(dtype).reshape(sample))
                for name, value in zip(self.param_names, (self.mean, self.std))}

    def apply_to(self, graphs: dict[str, Graph], params: dict[str, ParamInfo],
                 values: dict[str, np.ndarray]
                 ) -> tuple[dict[str, Graph], dict[str, ParamInfo], dict[str, np.ndarray]]:
        """A program's graphs, parameter infos and values with the scaling at the feature input:
        every graph prepended, the statistics joining the parameters as constants."""
        input_type = next((n.type for n in graphs["forward"].inputs
                           if n.attr["name"] == self.input), None)
        if input_type is None:
            raise ValueError(f"the program has no input {self.input!r} to scale")
        extra = self.params(input_type)
        return ({k: self.prepend(g) for k, g in graphs.items()},
                {**params, **{name: info for name, (info, _) in extra.items()}},
                {**values, **{name: value for name, (_, value) in extra.items()}})

    def prepend(self, graph: Graph) -> Graph:
        """`graph` with the scaling between its input `input` and every node that reads it."""
        new: dict[int, Node] = {}
        for node in graph.nodes():
            if node.op == "input" and node.attr["name"] == self.input:
                new[id(node)] = self._scaled(node)
            else:
                new[id(node)] = op_table.rebuilt(node, [new[id(i)] for i in node.inputs])
        return Graph(graph.name, tuple((name, new[id(n)]) for name, n in graph.outputs), graph.mode)

    def _scaled(self, x: Node) -> Node:
        if self.mode == "none":
            return x
        if not x.type.dtype.is_float:
            raise ValueError(f"input scaling {self.mode!r} makes fractions, but input {self.input} "
                             f"is {x.type}")
        dtype = x.type.dtype
        if self.mode == "unit":
            span = self.high - self.low
            shift = op_table.source("const", TensorType(dtype, ()), value=self.low)
            divisor = op_table.source("const", TensorType(dtype, ()), value=span if span else 1.0)
        else:
            ptype = TensorType(dtype, tuple(x.type.shape[1:]))
            shift, divisor = (op_table.source("param", ptype, name=name) for name in self.param_names)
        centred = op_table.apply("sub", [x, shift], loc=x.loc)
        return op_table.apply("div", [centred, divisor], loc=x.loc, name=x.name)

    def raw_values(self, scaled: np.ndarray) -> np.ndarray:
        """The inverse of the scaling: values already scaled as in training, back in raw units."""
        x = np.asarray(scaled, dtype=np.float64)
        if self.mode == "unit":
            span = self.high - self.low
            return x * (span if span else 1.0) + self.low
        if self.mode == "standardize":
            flat = x.reshape(len(x), math.prod(x.shape[1:]))     # zero samples too
            return (flat * self.std + self.mean).reshape(x.shape)
        return x

    def to_json(self) -> dict:
        out = {"input": self.input, "mode": self.mode, "raw_dtype": self.raw_dtype,
               "raw_range": list(self.raw_range), "scaled_range": list(self.scaled_range)}
        if self.mode == "unit":
            out.update(min=self.low, max=self.high)
        elif self.mode == "standardize":
            out.update(mean=np.asarray(self.mean).tolist(), std=np.asarray(self.std).tolist())
        return out

    @classmethod
    def from_json(cls, d: dict) -> Preprocessing:
        """Raises ValueError, KeyError or TypeError on a malformed record."""
        if not isinstance(d, dict):
            raise TypeError("the preprocessing record must be an object")
        mode = d["mode"]
        extra = {"unit": {"min", "max"}, "standardize": {"mean", "std"}}.get(mode, set())
        unknown = set(d) - {"input", "mode", "raw_dtype", "raw_range", "scaled_range"} - extra
        if unknown:
            raise ValueError(f"unknown preprocessing field {sorted(unknown)[0]!r}")
        np.dtype(str(d["raw_dtype"]))               # a dtype numpy knows
        fields = dict(input=str(d["input"]), mode=str(mode), raw_dtype=str(d["raw_dtype"]),
                      raw_range=_range(d["raw_range"]), scaled_range=_range(d["scaled_range"]))
        if mode == "unit":
            return cls(**fields, low=float(d["min"]), high=float(d["max"]))
        if mode == "standardize":
            return cls(**fields, mean=np.asarray(d["mean"], dtype=np.float64),
                       std=np.asarray(d["std"], dtype=np.float64))
        return cls(**fields)


def _fits(x: np.ndarray, extent: tuple[float, float]) -> tuple[bool, bool]:
    """Whether the values of `x` lie in `extent` (a margin of 5% of its width either side, one
    value in a thousand may stray), and whether they spread over a tenth of it at least."""
    low, high = extent
    width = high - low
    if not math.isfinite(width):
        return True, True
    margin = 0.05 * width
    inside = np.count_nonzero((x >= low - margin) & (x <= high + margin)) >= 0.999 * x.size
    return bool(inside), float(x.max() - x.min()) >= 0.1 * width


STANDARDIZE_SAMPLES = 8     # enough samples for their per-feature means to say where they lie


def _judge_standardized(preprocessing: Preprocessing, x: np.ndarray) -> str:
    """Per feature, as standardize scales: raw samples standardized by the training statistics
    have feature means near 0 (within a standard deviation); samples that are not raw (scaled
    already, or otherwise) sit far off on average. Scaled ones have feature means near 0 and
    spreads near 1 as they are. The global extremes cannot tell: one feature's range covers
    another's values."""
    flat = x.reshape(len(x), math.prod(x.shape[1:]))
    if flat.shape[1] != len(preprocessing.mean):
        return "raw"                    # the shape check that follows says what is wrong
    varied = preprocessing.std > 0
    if not np.any(varied):
        return "raw"
    mean, std = preprocessing.mean[varied], preprocessing.std[varied]
    as_raw = (flat[:, varied].mean(axis=0) - mean) / std
    if float(np.sqrt(np.mean(as_raw ** 2))) <= 1.0:
        return "raw"
    centred = float(np.sqrt(np.mean(flat[:, varied].mean(axis=0) ** 2))) <= 1.0
    spread = float(np.sqrt(np.mean(flat[:, varied].std(axis=0) ** 2)))
    return "scaled" if centred and 0.3 <= spread <= 3.0 else "neither"


def judge_inputs(preprocessing: Preprocessing, x: np.ndarray) -> str:
    """How raw-looking inputs are: "raw" (within the raw range seen in training, or the range is
    unknown), "scaled" (not raw, but within the scaled range: preprocessed already) or
    "neither" (far outside both)."""
    x = np.asarray(x, dtype=np.float64)
    if preprocessing.mode == "none" or not x.size or not np.all(np.isfinite(x)):
        return "raw"
    if preprocessing.mode == "standardize" and len(x) >= STANDARDIZE_SAMPLES:
        return _judge_standardized(preprocessing, x)
    raw_inside, raw_spread = _fits(x, preprocessing.raw_range)
    scaled_inside, scaled_spread = _fits(x, preprocessing.scaled_range)
    if raw_inside and (raw_spread or not (scaled_inside and scaled_spread)):
        return "raw"
    return "scaled" if scaled_inside else "neither"
