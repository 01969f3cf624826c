"""Option schemas: what an option of a train-block call (an optimizer's `lr`, a schedule's
`gamma`) or a plain setting accepts: its kind, default and range. The front end checks against
them; the registries that declare them (graphc.optim.OPTIMIZERS) need nothing else."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Opt:
    kind: str                  # float | int | bool | str | choice
    default: Any = None
    low: float | None = None   # inclusive lower bound
    high: float | None = None  # inclusive upper bound
    low_open: bool = False     # lower bound excluded
    high_open: bool = False
    choices: tuple = ()
    required: bool = False


def positive(kind="float", default=None, required=False) -> Opt:
    """A number > 0."""
    return Opt(kind, default, low=0, low_open=True, required=required)


def fraction(default, open_high=True) -> Opt:
    """A number in [0, 1) (or [0, 1] with open_high=False)."""
    return Opt("float", default, low=0, high=1, high_open=open_high)


NONNEGATIVE = Opt("float", 0.0, low=0)
