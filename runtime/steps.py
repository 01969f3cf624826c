"""Training by steps (language models on text): `steps` optimizer steps, each on a batch of random
windows drawn by the seed and the step's number alone (so a resumed run draws the same batches),
the learning rate read from a per-step schedule before each one, and every `eval_every` steps an
estimate of the train and val losses on `eval_batches` fixed batches, a checkpoint and a metrics
row. At the end, the loss over the whole validation split."""
from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from graphc.errors import error
from graphc.runtime.checkpoint import load_checkpoint, save_checkpoint
from graphc.runtime.schedules import make_schedule
from graphc.runtime.text_data import TextData
from graphc.runtime.train import KILL_AT_STEP, TrainSettings, feature_and_label

STEP_COLUMNS = ["step", "lr", "loss", "train_loss", "val_loss", "seconds", "tokens_per_s"]
_EVAL_STREAM = 1 << 40          # the evaluation batches' seeds, apart from every step's


@dataclass
class StepState:
    """What a resumed run needs besides parameters and optimizer state."""
    step: int = 0                                   # steps finished
    best: float | None = None                       # the lowest val loss estimate so far
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class StepTrainer:
    """Runs `settings.steps` train steps of `program` on batches of `data`, reporting each
    evaluation's row to `on_eval`; with a run folder, checkpoints at each evaluation. A
    warmup_cosine schedule without steps of its own decays over `horizon`, by default the
    steps (a run resumed for more steps keeps the steps it started with: graphc/train_cli.py)."""

    def __init__(self, program, settings: TrainSettings, data: TextData, run=None,
                 on_eval: Callable[[dict], None] | None = None, horizon: int | None = None):
        self.program, self.settings, self.data, self.run = program, settings, data, run
        self.on_eval = on_eval or (lambda row: None)
        self.features, self.labels = feature_and_label(program)
        name, options = settings.schedule
        if name == "warmup_cosine" and options.get("steps") is None:
            options = {**options, "steps": horizon or settings.steps}
        self.schedule = make_schedule((name, options), settings.lr)
        self.state = StepState()
        self.eval_every = settings.eval_every or settings.steps
        program.seed = settings.seed
        self.saved_steps = 0
        self._losses: list[float] = []              # train-step losses since the last evaluation
        self._tokens, self._seconds = 0, 0.0

    def lr(self, step: int) -> float:
        return self.schedule.at(step)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        x, y = self.data.batch("train", self.settings.batch,
                               np.random.default_rng([self.settings.seed, step]))
        return {self.features: x, self.labels: y}

    def resume(self) -> None:
        meta = load_checkpoint(self.run.last, self.program)
        if "steps" not in meta:
            raise error(f"{self.run.last}: holds no step-training state to resume")
        self.state = StepState(**meta["steps"])
        self.saved_steps = self.state.step

    def fit(self, until: int | None = None) -> dict:
        """Train to `settings.steps` (or to step `until`, stopping there as if interrupted);
        returns the final scores ({} when stopped early)."""
        stop = self.settings.steps if until is None else min(until, self.settings.steps)
        kill_at = int(os.environ.get(KILL_AT_STEP, "-1"))
        start = time.perf_counter()
        while self.state.step < stop:
            step = self.state.step
            if self.program.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            self.program.lr = self.lr(step)
            loss = self.program.train_step(**self.batch(step))
            if not math.isfinite(loss):
                raise error(f"step {step + 1}: the loss is {loss}",
                            hint="the learning rate may be too large for this model; try a "
                                 "smaller --lr")
            self._losses.append(loss)
            self.state.step += 1
            self._tokens += self.settings.batch * self.data.context
            if self.state.step % self.eval_every == 0 or self.state.step == self.settings.steps:
                self._seconds += time.perf_counter() - start
                self.end_interval()
                start = time.perf_counter()
        if self.state.step < self.settings.steps:
            return {}
        return self.finish()

    def estimate(self, split: str) -> float:
        """The mean evaluation loss on `eval_batches` batches of `split`, the same ones each time."""
        rng = np.random.default_rng([self.settings.seed, _EVAL_STREAM, 0 if split == "train" else 1])
        total = 0.0
        for _ in range(self.settings.eval_batches):
            x, y = self.data.batch(split, self.settings.batch, rng)
            total += float(self.program.evaluate(**{self.features: x, self.labels: y})["loss"])
        return total / self.settings.eval_batches

    def end_interval(self) -> None:
        state = self.state
        row = {"step": state.step, "lr": self.lr(state.step - 1),
               "loss": float(np.mean(self._losses)) if self._losses else None,
               "train_loss": self.estimate("train"), "val_loss": self.estimate("val"),
               "seconds": round(self._seconds, 3),
               "tokens_per_s": round(self._tokens / max(self._seconds, 1e-9))}
        self._losses = []
        state.history.append(row)
        improved = state.best is None or row["val_loss"] < state.best
        if improved:
            state.best = row["val_loss"]
        if self.run is not None:
            meta = self.checkpoint_state()
            if improved:
                save_checkpoint(self.run.best, self.program, meta)
            save_checkpoint(self.run.last, self.program, meta)
            self.run.write_rows("metrics", state.history, STEP_COLUMNS)
        self.saved_steps = state.step
        self.on_eval(row)

    def evaluate_split(self, split: str) -> float:
        """The loss over the whole split, in consecutive windows (weighted by their count)."""
        x, y = self.data.windows(split)
        total, n = 0.0, len(x)
        for lo in range(0, n, 64):
            chunk = slice(lo, lo + 64)
            scores = self.program.evaluate(**{self.features: x[chunk], self.labels: y[chunk]})
            total += float(scores["loss"]) * len(x[chunk])
        return total / max(n, 1)

    def finish(self) -> dict:
        scores = {"val": {"loss": self.evaluate_split("val")},
                  "val_estimate": self.state.history[-1]["val_loss"] if self.state.history else None,
                  "steps": self.state.step}
        if self.run is not None:
            self.run.save_trained(self.program, self.checkpoint_state())
            self.run.write_json("scores.json", scores)
        return scores

    def checkpoint_state(self) -> dict:
        return {"steps": self.state.to_json(), "seed": self.settings.seed,
                "rng": {"batches": "numpy default_rng([seed, step])",
                        "dropout": "key (seed << 32 | step)", "step": self.program.step}}
