"""Learning-rate schedules, stepped once per epoch like PyTorch's lr_scheduler: the train loop
reads `lr` before an epoch and reports the validation loss after it (warmup_cosine, and constant
when training by steps, are read per step instead: runtime/steps.py). State round-trips through
JSON so a resumed run continues the schedule exactly."""
from __future__ import annotations

import math


class Schedule:
    """The learning rate for each epoch. Subclasses with a closed form only override `at`."""

    def __init__(self, base_lr: float, **options):
        self.base_lr = float(base_lr)
        self.options = options
        self.epoch = 0               # epochs finished
        self.lr = self.at(0)

    def at(self, epoch: int) -> float:
        return self.base_lr

    def epoch_end(self, val_loss: float | None) -> None:
        """An epoch finished with this validation loss: set `lr` for the next one."""
        self.epoch += 1
        self.lr = self.at(self.epoch)

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "lr": self.lr}

    def load_json(self, state: dict) -> None:
        self.epoch, self.lr = int(state["epoch"]), float(state["lr"])


class Constant(Schedule):
    pass


class Step(Schedule):
    """lr * gamma ** (epoch // every): PyTorch's StepLR."""

    def at(self, epoch: int) -> float:
        return self.base_lr * self.options["gamma"] ** (epoch // self.options["every"])


class Exponential(Schedule):
    """lr * gamma ** epoch: PyTorch's ExponentialLR."""

    def at(self, epoch: int) -> float:
        return self.base_lr * self.options["gamma"] ** epoch


class Cosine(Schedule):
    """lr * (1 + cos(pi * epoch / epochs)) / 2: PyTorch's CosineAnnealingLR with eta_min 0, held
    at 0 past the end rather than rising again."""

    def at(self, epoch: int) -> float:
        t = min(epoch, self.options["epochs"])
        return self.base_lr * (1 + math.cos(math.pi * t / self.options["epochs"])) / 2


class Plateau(Schedule):
    """Multiply lr by `factor` when the validation loss has not improved (by PyTorch's default
    relative threshold, 1e-4) for more than `patience` epochs, never below `min_lr`: the course's
    "divide by 10 when the loss stagnates"; PyTorch's ReduceLROnPlateau in mode min."""

    THRESHOLD, EPS = 1e-4, 1e-8

    def __init__(self, base_lr: float, **options):
        self.best = math.inf
        self.bad_epochs = 0
        super().__init__(base_lr, **options)

    def epoch_end(self, val_loss: float | None) -> None:
        self.epoch += 1
        if val_loss is None:
            return
        if val_loss < self.best * (1 - self.THRESHOLD):
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.options["patience"]:
            new = max(self.lr * self.options["factor"], self.options["min_lr"])
            if self.lr - new > self.EPS:   # PyTorch ignores a reduction smaller than eps
                self.lr = new
            self.bad_epochs = 0

    def to_json(self) -> dict:
        return {**super().to_json(), "best": self.best if math.isfinite(self.best) else None,
                "bad_epochs": self.bad_epochs}

    def load_json(self, state: dict) -> None:
        super().load_json(state)
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.bad_epochs = int(state.get("bad_epochs", 0))


class WarmupCosine(Schedule):
    """Per training step (training by steps reads `at(step)` before each one): nanoGPT's
    schedule, lr * (step + 1) / (warmup + 1) for the first `warmup` steps, then a cosine from lr
    down to `min_lr` at step `steps`, and `min_lr` after."""

    def at(self, step: int) -> float:
        warmup, steps, floor = self.options["warmup"], self.options["steps"], self.options["min_lr"]
        if step < warmup:
            return self.base_lr * (step + 1) / (warmup + 1)
        if step > steps:
            return floor
        ratio = (step - warmup) / max(steps - warmup, 1)
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.base_lr - floor)


SCHEDULES = {"constant": Constant, "step": Step, "exponential": Exponential, "cosine": Cosine,
             "plateau": Plateau, "warmup_cosine": WarmupCosine}


def make_schedule(spec: tuple[str, dict] | list, base_lr: float) -> Schedule:
    name, options = spec
    return SCHEDULES[name](base_lr, **options)
