"""Weight and gradient norms over training (`graphc train --track-norms`), and the rule that flags
vanishing or exploding gradients in them. Rows go to RUN/norms.jsonl; `graphc report` plots them.

The warning rule, per recorded step:
  - vanishing: a parameter's gradient norm is below VANISHING (1e-7): it has all but stopped
    learning;
  - exploding: a gradient norm is above EXPLODING (1e3), or not finite;
  - imbalance: the gradient norms of the first and the last weight (in declaration order, which
    is layer order) differ by more than a factor SPREAD (1e4): the early layers learn at a very
    different speed from the late ones, the classic symptom in deep stacks of sigmoids or tanh.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from graphc.files import read_jsonl

NORMS = "norms.jsonl"
EVERY = 20                      # steps between records: a forward and backward pass each
VANISHING, EXPLODING, SPREAD = 1e-7, 1e3, 1e4


class NormRecorder:
    """Every `every` steps, the L2 norm of each parameter and of its gradient on the batch about to
    be trained on (`program.loss_and_grads`, which changes nothing: the step that follows is the
    one an untracked run takes), appended to `path` as one JSON row.

    The Trainer calls `observe(program, batch, epoch)` before each training step. A resumed run
    first drops the rows of steps it is about to take again, so no step is recorded twice."""

    def __init__(self, path, every: int = EVERY):
        if every < 1:
            raise ValueError(f"norms are recorded every K >= 1 steps, got {every}")
        self.path, self.every = Path(path), every
        self._started = False
        self._epoch, self._epoch_start = None, 0

    def observe(self, program, batch: dict, epoch: int) -> None:
        step = program.step
        if not self._started:
            self._keep_rows_before(step)
            self._started = True
        if epoch != self._epoch:         # runs (and resumes) start at epoch boundaries
            self._epoch, self._epoch_start = epoch, step
        if step % self.every:
            return
        loss, grads = program.loss_and_grads(**batch)
        row = {"step": step, "epoch": epoch, "epoch_start": self._epoch_start,
               "lr": float(program.lr), "loss": loss,
               "weights": {name: _norm(program.params[name]) for name in program.params},
               "grads": {name: _norm(grads[name]) for name in program.params}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _keep_rows_before(self, step: int) -> None:
        rows = [r for r in read_norms(self.path) if r["step"] < step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _norm(array: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(array, dtype=np.float64).ravel()))


def read_norms(path) -> list[dict]:
    """The recorded rows (none when the file is missing); a torn last line, as a killed run may
    leave, is skipped."""
    return read_jsonl(Path(path))


def gradient_warnings(rows: list[dict], weights: list[str] | None = None) -> list[dict]:
    """Where the rule of this module's docstring fires: one warning per parameter and kind (the
    first step it happens, and how many recorded steps it holds for). `weights` are the weight
    parameters in layer order (for the imbalance check; default: every parameter)."""
    found: dict[tuple[str, str], dict] = {}

    def flag(kind: str, name: str, row: dict, value: float, text: str) -> None:
        key = (kind, name)
        if key in found:
            found[key]["steps"] += 1
        else:
            found[key] = {"kind": kind, "param": name, "step": row["step"],
                          "epoch": row.get("epoch"), "value": value, "steps": 1, "text": text}

    for row in rows:
        grads = row.get("grads", {})
        for name, g in grads.items():
            if not math.isfinite(g) or g > EXPLODING:
                flag("exploding", name, row, g, f"gradient norm of {name} is {g:.3g} "
                     f"(above {EXPLODING:g}): exploding gradients")
            elif g < VANISHING:
                flag("vanishing", name, row, g, f"gradient norm of {name} is {g:.3g} "
                     f"(below {VANISHING:g}): vanishing gradients")
        order = [w for w in (weights or list(grads)) if w in grads]
        if len(order) >= 2:
            first, last = grads[order[0]], grads[order[-1]]
            low, high = sorted((first, last))
            if math.isfinite(high) and (low == 0 and high > 0 or low > 0 and high / low > SPREAD):
                ratio = math.inf if low == 0 else high / low
                flag("imbalance", f"{order[0]}/{order[-1]}", row, ratio,
                     f"gradient norms of {order[0]} ({first:.3g}) and {order[-1]} ({last:.3g}) "
                     f"differ by more than {SPREAD:g}x: the first and last layers learn at very "
                     f"different speeds")
    return list(found.values())
