"""The compiler-runtime contract: what a compiled model hands the runtime besides its graphs. The
train step's updates (which output becomes which parameter, optimizer-state slot or running
statistic) and its feeds (learning rate, random key, step count) are typed fields, PyTensor's
`updates` as data; the names of outputs, inputs and state slots are made here and parsed nowhere.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from graphc.ir.node import Graph, Node
from graphc.ir.types import TensorType, bind_shape

# Inputs and state the program itself provides. '#' starts a comment in .nn files, so no name a
# user writes can collide with them (nor with a state slot `W#exp_avg`).
LR_INPUT = "#lr"           # the learning rate: an input, so schedules never recompile
RNG_INPUT = "#rng"         # the step's random key (dropout masks)
STEP_STATE = "#step"       # the step count: optimizer state, advanced by the train step
FED_INPUTS = frozenset({LR_INPUT, RNG_INPUT})


def state_name(param: str, slot: str) -> str:
    """The state holding optimizer slot `slot` (a moment, an accumulator) of `param`."""
    return f"{param}#{slot}"


def new_output(target: str) -> str:
    """The train step's output holding the new value of `target` (what `graphc graph` shows)."""
    return f"new {target}"


def grad_output(param: str) -> str:
    """The output of `loss_and_grads` holding the gradient of `param`."""
    return f"grad {param}"


def stat_output(param: str) -> str:
    """The training graph's output holding the new value of running statistic `param`."""
    return f"stat {param}"


def rng_key(seed: int, step: int) -> int:
    """The random key of a training step: dropout masks are a function of (seed, step) alone."""
    return ((seed & 0x7FFFFFFF) << 32) | (step & 0xFFFFFFFF)


class UpdateKind(enum.Enum):
    PARAM = "param"     # a parameter's new value, from the optimizer
    SLOT = "slot"       # a slot of a parameter's optimizer state (velocity, moments, sums)
    STEP = "step"       # the step count
    STAT = "stat"       # a running statistic (batch norm's): a parameter no optimizer touches


@dataclass(frozen=True)
class Update:
    """Output `output` of the train step becomes `target`. `param` is the parameter the update
    belongs to (itself for PARAM and STAT, the owner of a SLOT, None for STEP); `slot` names a
    SLOT's slot."""
    output: str
    target: str
    kind: UpdateKind
    param: str | None = None
    slot: str | None = None

    @property
    def in_state(self) -> bool:
        """Whether the target is optimizer state (else a parameter)."""
        return self.kind in (UpdateKind.SLOT, UpdateKind.STEP)

    def to_json(self) -> dict:
        return {"output": self.output, "target": self.target, "kind": self.kind.value,
                "param": self.param, "slot": self.slot}

    @classmethod
    def from_json(cls, data: dict) -> Update:
        param, slot = data.get("param"), data.get("slot")
        if not all(isinstance(data[k], str) for k in ("output", "target")) or \
                not all(v is None or isinstance(v, str) for v in (param, slot)):
            raise ValueError(f"malformed update {data!r}")
        return cls(data["output"], data["target"], UpdateKind(data["kind"]), param, slot)


@dataclass(frozen=True)
class Feeds:
    """What the program feeds a train step besides the batch (None: the step does not read it)."""
    lr: str | None = LR_INPUT
    rng: str | None = None
    step: str | None = STEP_STATE

    @classmethod
    def of(cls, graph: Graph, state) -> Feeds:
        """The feeds `graph` reads, `state` being the names of the optimizer state."""
        inputs = {n.attr["name"] for n in graph.inputs}
        return cls(LR_INPUT if LR_INPUT in inputs else None,
                   RNG_INPUT if RNG_INPUT in inputs else None,
                   STEP_STATE if STEP_STATE in state else None)


@dataclass(frozen=True)
class TrainStep:
    """The contract of graph `train_step`: its loss output, its updates in output order, and its
    feeds. A backend that writes an update in place may leave its output out of a run's results."""
    loss: str = "loss"
    updates: tuple[Update, ...] = ()
    feeds: Feeds = field(default_factory=Feeds)

    def to_json(self) -> dict:
        return {"loss": self.loss, "updates": [u.to_json() for u in self.updates],
                "feeds": {"lr": self.feeds.lr, "rng": self.feeds.rng, "step": self.feeds.step}}

    @classmethod
    def from_json(cls, data: dict) -> TrainStep:
        feeds = data["feeds"]
        if not all(feeds.get(k) is None or isinstance(feeds[k], str) for k in ("lr", "rng", "step")):
            raise ValueError("malformed train-step feeds")
        return cls(str(data["loss"]), tuple(Update.from_json(u) for u in data["updates"]),
                   Feeds(feeds.get("lr"), feeds.get("rng"), feeds.get("step")))

    @classmethod
    def of_legacy_graph(cls, graph: Graph, params: dict[str, ParamInfo],
                        state: dict[str, StateInfo]) -> TrainStep:
        """The contract of a train step built before contracts were recorded (artifacts of
        graphc 0.1.0 without a `train_step` manifest entry), derived from its output names: the
        one place that reads them. `new X` updates X (state where X is state); a state slot is
        named `PARAM#SLOT`."""
        updates = []
        for name, _ in graph.outputs:
            if not name.startswith("new "):
                continue
            target = name[len("new "):]
            if target == STEP_STATE:
                updates.append(Update(name, target, UpdateKind.STEP))
            elif target in state:
                param, _, slot = target.partition("#")
                updates.append(Update(name, target, UpdateKind.SLOT, param, slot))
            elif target in params:
                kind = UpdateKind.STAT if params[target].role == "stat" else UpdateKind.PARAM
                updates.append(Update(name, target, kind, target))
            else:
                raise ValueError(f"train-step output {name!r} updates nothing the manifest declares")
        return cls("loss", tuple(updates), Feeds.of(graph, state))


def bind_updates(graph: Graph, updates: Sequence[Update]) -> list[tuple[Update, Node, Node]]:
    """The analysis of a graph's updates that every backend starts from: each update with its
    output node and the load (`param` or `state` source) of its target, where the graph reads the
    target and the new value has its type. Only these can be written in place."""
    outputs = graph.output_map
    loads = {(n.op, n.attr["name"]): n for n in graph.nodes() if n.op in ("param", "state")}
    bound = []
    for u in updates:
        out, load = outputs.get(u.output), loads.get(("state" if u.in_state else "param", u.target))
        if out is not None and load is not None and out.type == load.type:
            bound.append((u, out, load))
    return bound


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: TensorType
    role: str              # weight | bias | stat | other
    init: tuple            # (initializer, ((option, value), ...))

    @property
    def count(self) -> int:
        return self.type.size()


@dataclass(frozen=True)
class StateInfo:
    """One slot of optimizer state (a moment, an accumulator, the step count)."""
    name: str
    type: TensorType
    init: float

    def initial(self) -> np.ndarray:
        return np.full(bind_shape(self.type.shape, {}), self.init, dtype=self.type.dtype.numpy)


@dataclass
class CompiledModel:
    """What the compiler hands the runtime: the lowered graphs (`forward`, and where they exist
    `sample`, `evaluate`, `loss_and_grads`, `train_step`), the train step's contract, the
    parameters (descriptions and initial values), the optimizer state, and plain-JSON meta
    (source, seed, task, train settings)."""
    name: str
    graphs: dict[str, Graph]
    params: dict[str, ParamInfo]
    values: dict[str, np.ndarray]
    state: dict[str, StateInfo] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    train_step: TrainStep | None = None
