"""The training loop: seeded minibatches through the compiled train step, validation every
epoch, learning-rate schedules, early stopping, atomic checkpoints and bit-identical resume."""
from __future__ import annotations

import collections
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from graphc.errors import error
from graphc.images import image_shape
from graphc.ir.preprocess import Preprocessing
from graphc.runtime.augment import BLOCK, CHUNK, Augmenter, ahead, prefetch
from graphc.runtime.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from graphc.runtime.data import Scaler, batches, check_labels, fit_inputs, load_dataset, split
from graphc.runtime.numerics import Divergence, Snapshot, locate_non_finite, step_is_finite
from graphc.runtime.schedules import SCHEDULES, make_schedule
from graphc.train_config import TrainConfig

# The columns of metrics.csv, in order (runs.RunFolder writes them; fit's History reads them).
METRIC_COLUMNS = ["epoch", "lr", "loss", "accuracy", "val_loss", "val_accuracy", "seconds",
                  "samples_per_s"]
EVAL_BATCH = 256          # samples per evaluation pass: a CNN's activations at 2048 took 3 GB
TRAIN_SCORED = 10_000     # training samples scored each epoch for the training accuracy, at most
# Fault injection for the crash-safety tests: the process kills itself (SIGKILL, no cleanup) just
# before this training step.
KILL_AT_STEP = "GRAPHC_FAULT_KILL_AT_STEP"


class TrainSettings(TrainConfig):
    """A train block (graphc.train_config.TrainConfig, read from the program's JSON) after
    command-line overrides."""

    @classmethod
    def of(cls, program, **overrides) -> TrainSettings:
        """The settings of `program`'s train block, with overrides (None means keep)."""
        train = program.meta.get("train")
        if not train:
            raise error(f"model {program.name} has no train block",
                        hint=f"add `train {program.name} {{ optimizer = adam(lr=1e-3) }}` to its "
                             f"file")
        try:
            settings = cls.from_json(program.name, train)
            if settings.schedule.name not in SCHEDULES:
                raise ValueError(f"unknown schedule {settings.schedule.name!r}")
            _check_ranges(settings)
        except (KeyError, TypeError, ValueError) as err:
            raise error(f"model {program.name}: malformed train settings ({err})") from None
        lr = overrides.pop("lr", None)
        if lr is not None:
            settings = replace(settings, optimizer=settings.optimizer.with_options(lr=lr))
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        try:                    # the overrides (fit's arguments, the command line) as well
            _check_ranges(settings)
        except ValueError as err:
            raise error(f"model {program.name}: {err}") from None
        return settings


def _check_ranges(settings: TrainSettings) -> None:
    lr = settings.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"the learning rate must be a finite number > 0, not {lr!r}")
    for name, low in (("batch", 1), ("epochs", 0), ("seed", 0)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer of at least {low}, not {value!r}")


@dataclass
class Data:
    """The splits, fitted to the model's inputs: scaled with the training statistics for a program
    without preprocessing (training feeds them to its graphs as they are), raw for a program that
    holds its preprocessing. `preprocessing` is the scaling as graph nodes (graphc.ir.preprocess),
    what the trained model carries."""
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    scaler: Scaler
    features: str
    labels: str
    source: str
    classes: list[str] | None = None
    preprocessing: Preprocessing | None = None

    def describe(self) -> dict:
        return {"source": self.source, "sizes": {k: len(v[1]) for k, v in self.splits.items()},
                "scaler": self.scaler.to_json(), "features": self.features,
                "labels": self.labels, "classes": self.classes,
                "preprocess": self.preprocessing.to_json() if self.preprocessing else None}


def feature_and_label(program) -> tuple[str, str]:
    task = program.meta.get("task") or {}
    features, labels = task.get("features", []), task.get("labels", [])
    if len(features) != 1 or len(labels) != 1:
        raise error(f"model {program.name}: training feeds one input of features and one of "
                    f"labels (an input the loss uses but no output does); this model has "
                    f"features {features or 'none'} and labels {labels or 'none'}")
    return features[0], labels[0]


SPLITS = ("train", "val", "test")


def prepare_data(program, settings: TrainSettings, data_dir: str | None = None,
                 base_dir: str | Path = ".", scaler: dict | None = None,
                 splits: tuple[str, ...] = SPLITS) -> Data:
    """Load, split, fit to the model's inputs and (for a program without preprocessing) scale.
    `scaler` (from a run's record) reuses fitted statistics instead of fitting them again;
    `splits` names the splits wanted (the others are not fitted, to save memory)."""
    dataset = load_dataset(settings.data, data_dir=data_dir, base_dir=base_dir)
    what = dataset.source if dataset.name in ("npz", "csv") else dataset.name   # name the file
    _, labels = feature_and_label(program)
    check_labels(dataset, program.train_inputs[labels], what, labels, _num_classes(program))
    parts = split(dataset, settings.validation, settings.test, settings.seed)
    return data_of_splits(program, settings, parts, what, dataset.source, dataset.classes,
                          scaler, splits)


def _num_classes(program) -> int | None:
    """The number of classes of a classifier whose output says it, else None."""
    task = program.meta.get("task") or {}
    if task.get("kind") != "classification":
        return None
    out_type = program.graphs["forward"].output_map[task["output"]].type
    return out_type.shape[1] if isinstance(out_type.shape[1], int) else None


def data_of_splits(program, settings: TrainSettings, parts: dict[str, tuple], what: str,
                   source: str, classes: list[str] | None = None, scaler: dict | None = None,
                   splits: tuple[str, ...] = SPLITS) -> Data:
    """Raw splits {name: (x, y)} fitted to the model's inputs and, for a program without
    preprocessing, scaled with statistics fitted on "train" (or `scaler`'s)."""
    features, labels = feature_and_label(program)
    x_type, y_type = program.train_inputs[features], program.train_inputs[labels]
    num_classes = _num_classes(program)
    raw = program.preprocessing is not None
    fit_train = "train" in splits or (not raw and scaler is None)
    fitted = {k: fit_inputs(x, y, x_type, y_type, what, x_name=features, y_name=labels,
                            num_classes=num_classes)
              for k, (x, y) in parts.items() if k in splits or (k == "train" and fit_train)}
    splits = tuple(k for k in splits if k in parts)
    if raw:      # the program scales its input itself, with the statistics it was trained with
        return Data({k: fitted[k] for k in splits}, Scaler("none"), features, labels, source,
                    classes, program.preprocessing)
    scale = Scaler.from_json(scaler) if scaler else Scaler.fit(settings.scale, fitted["train"][0])
    dtype = x_type.dtype.numpy
    scaled = {k: (scale.apply(x, dtype=dtype), y) for k, (x, y) in fitted.items()}
    prep = preprocessing_of(scale, features, parts["train"][0],
                            scaled["train"][0] if "train" in scaled else None)
    return Data({k: scaled[k] for k in splits}, scale, features, labels, source, classes, prep)


def preprocessing_of(scale: Scaler, features: str, raw_train: np.ndarray,
                     scaled_train: np.ndarray | None) -> Preprocessing:
    """The fitted scaling as graph nodes, with what raw input it expects: the data set's dtype
    and the range of the raw (and scaled) training features."""
    def extent(x) -> tuple[float, float]:
        if x is None or not x.size:
            return math.nan, math.nan
        return float(np.min(x)), float(np.max(x))
    return Preprocessing(features, scale.mode, raw_train.dtype.name, extent(raw_train),
                         extent(scaled_train), low=scale.low, high=scale.high, mean=scale.mean,
                         std=scale.std)


def evaluate_arrays(program, x: np.ndarray, y: np.ndarray, features: str, labels: str,
                    batch: int = EVAL_BATCH) -> dict[str, float]:
    """Evaluation-mode scores over a whole split, in chunks; means weighted by chunk size."""
    totals: dict[str, float] = {}
    for start in range(0, len(y), batch):
        chunk = slice(start, start + batch)
        scores = program.evaluate(**{features: x[chunk], labels: y[chunk]})
        n = len(y[chunk])
        for k, v in scores.items():
            totals[k] = totals.get(k, 0.0) + v * n
    return {k: v / max(len(y), 1) for k, v in totals.items()}


@dataclass
class LoopState:
    """Everything besides parameters and optimizer state that a resumed run needs."""
    epoch: int = 0                                  # epochs finished
    schedule: dict = field(default_factory=dict)
    best: float | None = None                       # best value of the monitored metric
    best_epoch: int = 0
    bad_epochs: int = 0                             # epochs since the best (early stopping)
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Trainer:
    """Runs `settings.epochs` epochs of `program.train_step` over `data`, reporting each epoch to
    `on_epoch(row)`; with a run folder (a runs.RunFolder), checkpoints every epoch and writes
    metrics."""

    def __init__(self, program, settings: TrainSettings, data: Data, run=None,
                 on_epoch: Callable[[dict], None] | None = None, progress: bool = False,
                 norms=None, check_numerics: bool = False,
                 on_warning: Callable[[str], None] | None = None):
        self.program, self.settings, self.data, self.run = program, settings, data, run
        # --check-numerics: each step is checked, and the first non-finite value located
        self.check_numerics = check_numerics
        self.divergence = Divergence()
        self.on_warning = on_warning or (lambda message: None)
        self.norms = norms           # a runtime.norms.NormRecorder (--track-norms), or None
        self.on_epoch = on_epoch or (lambda row: None)
        self.progress = progress
        self.schedule = make_schedule(settings.schedule, settings.lr)
        self.loop = LoopState(schedule=self.schedule.to_json())
        self.saved_epochs = 0        # epochs whose checkpoint is on disk
        self.best_params: dict[str, np.ndarray] | None = None
        program.seed = settings.seed
        program.lr = self.schedule.lr
        rule = settings.early_stop.options if settings.early_stop else {}
        self.monitor = rule.get("on", "val_loss")
        self.patience = rule.get("patience")
        self.augmenter = _augmenter(program, settings, data.features)
        self.trained_samples, self.trained_seconds = 0, 0.0     # this process's, for samples/s
        self._scored: tuple | None = None                       # training samples scored per epoch

    def resume(self) -> None:
        """Continue from the run folder's last checkpoint."""
        meta = load_checkpoint(self.run.last, self.program)
        if "loop" not in meta:
            raise error(f"{self.run.last}: holds parameters but no training loop state to resume")
        loop = meta["loop"]
        self.loop = LoopState(**loop)
        self.saved_epochs = self.loop.epoch
        self.schedule.load_json(self.loop.schedule)
        self.program.lr = self.schedule.lr
        if self.run.best.is_file():
            params, _, _ = read_checkpoint(self.run.best, self.program)
            self.best_params = {k: params[k] for k in self.program.param_info}

    def fit(self) -> dict:
        x, y = self.data.splits["train"]
        while self.loop.epoch < self.settings.epochs and not self.loop.stopped_early:
            row = self.train_epoch(x, y)
            self.end_epoch(row)
        return self.finish()

    def finish(self) -> dict:
        """After the last epoch: the best parameters back (early stopping), the final scores, and
        the trained model in the run folder."""
        if self.settings.early_stop and self.best_params is not None:
            for name, value in self.best_params.items():   # early stopping restores the best
                self.program.params[name] = value
        scores = {split: evaluate_arrays(self.program, *self.data.splits[split], self.data.features,
                                         self.data.labels)
                  for split in ("val", "test") if split in self.data.splits}
        if self.run is not None:
            self.run.save_trained(self.program, self.checkpoint_state(), self.data.preprocessing)
            self.run.write_json("scores.json", {**scores, "epochs": self.loop.epoch,
                                                "best_epoch": self.loop.best_epoch,
                                                "stopped_early": self.loop.stopped_early})
        return scores

    def train_epoch(self, x: np.ndarray, y: np.ndarray) -> dict:
        epoch = self.loop.epoch
        order = self.epoch_order(len(y), epoch)
        kill_at = int(os.environ.get(KILL_AT_STEP, "-1"))
        bar = _progress(len(order), f"epoch {epoch + 1}/{self.settings.epochs}", self.progress)
        start = time.perf_counter()
        losses = _Losses(epoch, self.divergence.observe)
        features, labels = self.data.features, self.data.labels

        feeds = (self._augmented(x, y, order, epoch) if self.augmenter is not None else
                 ({features: x[index], labels: y[index]} for index in order))
        for i, (index, feed) in enumerate(zip(order, map(self.shard, feeds))):
            if self.program.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.norms is not None:
                self.norms.observe(self.program, feed, epoch + 1)
            # Queued: on a GPU the step runs while the next batch is prepared, and its loss is
            # taken in once the device has it; the host waits for the device at the epoch's end.
            if self.check_numerics:
                losses.add(i, len(index), self._checked_step(feed, f"epoch {epoch + 1}, step {i + 1}"))
            else:
                losses.add(i, len(index), self.program.queue_train_step(**feed))
            if bar is not None and (i % 20 == 0 or i == len(order) - 1):
                rate = losses.seen / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"loss {losses.mean:.4f}, {rate:,.0f} samples/s",
                                    refresh=False)
            if bar is not None:
                bar.update()
        losses.settle(wait=True)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        # Throughput over every epoch this process has trained: one short epoch's rate swings
        # with the machine's load and the timer's resolution.
        self.trained_samples += losses.seen
        self.trained_seconds += seconds
        return {"epoch": epoch + 1, "lr": self.program.lr, "loss": losses.mean,
                "seconds": round(seconds, 4),
                "samples_per_s": round(self.trained_samples / max(self.trained_seconds, 1e-9))}

    def epoch_order(self, n: int, epoch: int) -> list[np.ndarray]:
        """The index arrays of the epoch's minibatches (a data-parallel run leaves out a last one
        too small to share, runtime.distributed)."""
        return batches(n, self.settings.batch, self.settings.seed, epoch)

    def shard(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What this process trains on of a minibatch: all of it (a data-parallel rank: its
        shard, runtime.distributed)."""
        return feed

    def training_scores(self) -> dict[str, float]:
        """Evaluation-mode scores on the training split (at most TRAIN_SCORED samples of it, the
        same ones every epoch, drawn once by the seed), beside the validation scores."""
        if self._scored is None:
            x, y = self.data.splits["train"]
            if len(y) > TRAIN_SCORED:
                pick = np.sort(np.random.default_rng([self.settings.seed, 1]).choice(
                    len(y), TRAIN_SCORED, replace=False))
                x, y = x[pick], y[pick]
            self._scored = (x, y)
        return evaluate_arrays(self.program, *self._scored, self.data.features, self.data.labels)

    def _checked_step(self, feed: dict[str, np.ndarray], where: str) -> _Finished:
        """One train step, waited for, whose loss and written-back values must be finite; the
        first node that made one that is not is found by running the step again node by node."""
        snapshot = Snapshot.of(self.program)
        loss = self.program.train_step(**feed)
        if not step_is_finite(self.program, loss):
            raise locate_non_finite(self.program, snapshot, feed, where)
        return _Finished(loss)

    def _augmented(self, x: np.ndarray, y: np.ndarray, order: list[np.ndarray],
                   epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """The epoch's batches with their features augmented, BLOCK batches per call of
        the augmenter (its fixed cost is then shared). The augmentation reads the samples where
        they lie in x: no gathered copy first. With cores to spare it runs a block ahead, in a
        background thread; on two cores the step's BLAS threads use both, and a third thread
        only contends with them (see `augment.ahead`)."""
        starts = np.cumsum([0] + [len(index) for index in order])    # each batch's position
        blocks = range(0, len(order), BLOCK)

        def block(b: int) -> list[np.ndarray]:
            first, last = blocks[b], min(blocks[b] + BLOCK, len(order))
            xs = self.augmenter(x, epoch, int(starts[first]),
                                index=np.concatenate(order[first:last]))
            return np.split(xs, starts[first + 1:last] - starts[first])

        made = prefetch(block, len(blocks)) if ahead() else map(block, range(len(blocks)))
        features, labels = self.data.features, self.data.labels
        for xs, first in zip(made, blocks):
            for xb, index in zip(xs, order[first:first + BLOCK]):
                yield {features: xb, labels: y[index]}

    def end_epoch(self, row: dict) -> None:
        val = evaluate_arrays(self.program, *self.data.splits["val"], self.data.features,
                              self.data.labels)
        row["accuracy"] = self.training_scores().get("accuracy") if "accuracy" in val else None
        row["val_loss"] = val["loss"]
        row["val_accuracy"] = val.get("accuracy")
        diverging = self.divergence.check(row["loss"], row["epoch"], self.program.lr,
                                          f"schedule {self.settings.schedule[0]}, base learning "
                                          f"rate {self.settings.lr:g}")
        if diverging:
            self.on_warning(diverging)
        loop = self.loop
        loop.epoch += 1
        self.schedule.epoch_end(val["loss"])
        self.program.lr = self.schedule.lr
        loop.schedule = self.schedule.to_json()
        value = row.get(self.monitor)
        higher = self.monitor == "val_accuracy"
        improved = value is not None and (loop.best is None or
                                           (value > loop.best if higher else value < loop.best))
        if improved:
            loop.best, loop.best_epoch, loop.bad_epochs = value, loop.epoch, 0
            self.best_params = {k: v.copy() for k, v in self.program.params.items()}
        else:
            loop.bad_epochs += 1
            if self.patience is not None and loop.bad_epochs >= self.patience:
                loop.stopped_early = True
        loop.history.append(row)
        if self.run is not None:
            state = self.checkpoint_state()
            if improved:
                save_checkpoint(self.run.best, self.program, state)
            save_checkpoint(self.run.last, self.program, state)
            self.saved_epochs = loop.epoch      # resumable from here, even if stopped just below
            self.run.write_metrics(loop.history)
        self.saved_epochs = loop.epoch
        self.on_epoch(row)

    def checkpoint_state(self) -> dict:
        return {"loop": self.loop.to_json(), "seed": self.settings.seed,
                "rng": {"shuffle": "numpy default_rng([seed, epoch])",
                        "augment": f"numpy default_rng([seed, epoch, position // {CHUNK}, tag])",
                        "dropout": "key (seed << 32 | step)", "step": self.program.step}}


class _Finished(float):
    """A loss already read (a step that was waited for), where the loop takes a queued `Loss`."""

    def ready(self) -> bool:
        return True


class _Losses:
    """An epoch's training losses as they come back: their mean over the samples, and the first
    that is not finite stops the run (naming its step)."""

    def __init__(self, epoch: int, observe: Callable[[float], None] = lambda loss: None):
        self.epoch, self.seen, self.total = epoch, 0, 0.0
        self.observe = observe
        self.waiting: collections.deque = collections.deque()     # (step, samples, Loss)

    def add(self, step: int, samples: int, loss) -> None:
        self.waiting.append((step, samples, loss))
        self.settle(wait=False)

    def settle(self, wait: bool) -> None:
        """Take in the losses that are back (all of them, waiting for the device, with `wait`)."""
        while self.waiting and (wait or self.waiting[0][2].ready()):
            step, samples, loss = self.waiting.popleft()
            value = float(loss)
            if not math.isfinite(value):
                raise error(f"epoch {self.epoch + 1}, step {step + 1}: the loss is {value}",
                            hint="the learning rate may be too large for this model; try a "
                                 "smaller --lr, or train with --check-numerics to find the "
                                 "operation that first made a non-finite value")
            self.observe(value)
            self.seen += samples
            self.total += value * samples

    @property
    def mean(self) -> float:
        return self.total / max(self.seen, 1)


def _augmenter(program, settings: TrainSettings, features: str) -> Augmenter | None:
    """The train block's augmentations for the features input, or None without any."""
    if not settings.augment:
        return None
    t = program.train_inputs[features]
    try:
        if not t.dtype.is_float:
            raise ValueError(f"augment needs a float input; {features} is {t}")
        return Augmenter(list(settings.augment), image_shape(t.shape), settings.seed)
    except ValueError as err:
        raise error(f"model {program.name}: {err}") from None


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr when it is a terminal (and not turned off), else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
