"""A train block, resolved: typed settings that the front end produces, the compiler reads and the
runtime's training loop runs with. Artifacts and run folders hold it as plain JSON (calls as
`[name, {options}]`); `TrainConfig.from_json` is the one place that JSON is read back."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, NamedTuple


# The calls of a train block. Named tuples, not dataclasses: they are immutable and typed, read
# by field (`spec.name`, `spec.options`), and `list(spec)` is their JSON, `[name, {options}]`.
class OptimizerSpec(NamedTuple):
    name: str
    options: dict

    @property
    def lr(self) -> float:
        return float(self.options["lr"])

    def with_options(self, **options) -> OptimizerSpec:
        return OptimizerSpec(self.name, {**self.options, **options})


class ScheduleSpec(NamedTuple):
    name: str
    options: dict


class DataSpec(NamedTuple):
    name: str
    options: dict


class AugmentSpec(NamedTuple):
    name: str
    options: dict


class EarlyStopSpec(NamedTuple):
    name: str               # "early_stop"
    options: dict           # patience, on


def call_from_json(cls, value):
    """A call of a train block (cls: OptimizerSpec, ...) from its JSON, `[name, {options}]`."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ValueError(f"expected [name, {{options}}], got {value!r}")
    name, options = value
    if not isinstance(name, str) or not isinstance(options, dict):
        raise ValueError(f"expected [name, {{options}}], got {value!r}")
    return cls(name, dict(options))


@dataclass(frozen=True)
class TrainConfig:
    """The settings of `model`'s train block, every default filled in (graphc/frontend/train_spec
    declares them); `written`: the settings the block writes, in its order (for display)."""
    model: str
    optimizer: OptimizerSpec
    batch: int
    epochs: int
    seed: int
    validation: float
    test: float
    scale: str
    device: str
    clip_grad_value: float | None
    clip_grad_norm: float | None
    data: DataSpec
    schedule: ScheduleSpec
    augment: tuple[AugmentSpec, ...]            # training batches only, in this order
    early_stop: EarlyStopSpec | None
    backend: str = "auto"                       # graphc.targets.backend_for reads it
    # Training by steps (a text data set): so many optimizer steps on random windows, evaluated
    # every `eval_every` steps on `eval_batches` batches of each split. None: by epochs.
    steps: int | None = None
    eval_every: int | None = None
    eval_batches: int = 20
    written: tuple[str, ...] = ()

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    def items(self) -> list[tuple[str, Any]]:
        """(setting, value) of every setting: those written first, in the block's order."""
        names = [f.name for f in fields(self) if f.name not in ("model", "written")]
        ordered = [n for n in self.written if n in names] + [n for n in names if n not in self.written]
        return [(n, getattr(self, n)) for n in ordered]

    def to_json(self) -> dict:
        def plain(v):
            if isinstance(v, tuple) and v and isinstance(v[0], tuple):
                return [list(x) for x in v]
            return list(v) if isinstance(v, tuple) else v
        return {name: plain(value) for name, value in self.items()}

    @classmethod
    def from_json(cls, model: str, data: dict) -> TrainConfig:
        """The settings of an artifact's or a run's JSON; ValueError (or KeyError, TypeError)
        where it is malformed. Settings added after graphc 0.1.0 may be absent."""
        early = data.get("early_stop")
        return cls(model, optimizer=call_from_json(OptimizerSpec, data["optimizer"]),
                   data=call_from_json(DataSpec, data["data"]),
                   schedule=call_from_json(ScheduleSpec, data["schedule"]),
                   batch=int(data["batch"]), epochs=int(data["epochs"]), seed=int(data["seed"]),
                   validation=float(data["validation"]), test=float(data["test"]),
                   scale=str(data["scale"]), device=str(data.get("device", "cpu")),
                   clip_grad_value=_number(data.get("clip_grad_value")),
                   clip_grad_norm=_number(data.get("clip_grad_norm")),
                   augment=tuple(call_from_json(AugmentSpec, a) for a in data.get("augment") or ()),
                   early_stop=call_from_json(EarlyStopSpec, early) if early else None,
                   backend=str(data.get("backend", "auto")),
                   steps=_count(data.get("steps")), eval_every=_count(data.get("eval_every")),
                   eval_batches=int(data.get("eval_batches", 20)))


def _count(value) -> int | None:
    return None if value is None else int(value)


def _number(value) -> float | None:
    return None if value is None else float(value)
