"""The Python API a Keras or PyTorch user reaches for: `Program.fit` on in-memory arrays (the
train block's optimizer, schedule, early stopping and scaling, through the same `Trainer` as
`graphc train`), its `History`, and `load_run`."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from graphc.errors import error
from graphc.runtime.program import ProgramError
from graphc.runtime.runs import METRIC_COLUMNS, RunFolder
from graphc.runtime.train import Trainer, TrainSettings, data_of_splits


class History:
    """Per-epoch metrics of a `fit`: `history["val_loss"]` is a column (one value per epoch,
    as in metrics.csv), `history.rows` the rows, `history.scores` the final validation scores."""

    def __init__(self, rows: list[dict], scores: dict):
        self.rows, self.scores = rows, scores
        self.columns = [c for c in METRIC_COLUMNS if any(c in r for r in rows)]

    def __getitem__(self, column: str) -> list:
        if column not in self.columns:
            raise KeyError(f"no column {column!r} (columns: {', '.join(self.columns)})")
        return [row.get(column) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def history(self) -> dict[str, list]:
        """Keras' form: {column: values per epoch}."""
        return {c: self[c] for c in self.columns}

    def __repr__(self) -> str:
        last = self.rows[-1] if self.rows else {}
        shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "val_loss", "val_accuracy")
                          if last.get(k) is not None)
        return f"<History of {len(self.rows)} epochs{': ' + shown if shown else ''}>"


def fit(program, x, y, *, epochs: int | None = None, batch: int | None = None,
        validation: tuple | float | None = None, callbacks: Sequence[Callable] = (),
        lr: float | None = None, seed: int | None = None) -> History:
    """Train `program` on raw arrays `x`, `y` with its train block (see Program.fit)."""
    settings = TrainSettings.of(program, epochs=epochs, batch=batch, lr=lr, seed=seed)
    parts = _splits(np.asarray(x), np.asarray(y), validation, settings)
    data = data_of_splits(program, settings, parts, "the arrays given to fit", "arrays",
                          splits=("train", "val"))
    hooks = [_hook(c) for c in callbacks]
    trainer = Trainer(program, settings, data,
                      on_epoch=lambda row: [hook(dict(row)) for hook in hooks])
    scores = trainer.fit()
    if program.preprocessing is None and data.preprocessing is not None:
        program.add_preprocessing(data.preprocessing)     # from now on it takes raw data
    return History(trainer.loop.history, scores)


def _splits(x: np.ndarray, y: np.ndarray, validation, settings: TrainSettings) -> dict:
    """{"train", "val"}: the validation pair as given, or a fraction of x held out (shuffled by
    the seed, as `graphc train` holds out the validation share of a data set with a test split)."""
    if len(x) != len(y):
        raise ProgramError(f"fit: x holds {len(x)} samples but y {len(y)}")
    if isinstance(validation, (tuple, list)):
        if len(validation) != 2:
            raise ProgramError("fit: validation is (x_val, y_val) or a fraction")
        return {"train": (x, y), "val": tuple(np.asarray(v) for v in validation)}
    fraction = settings.validation if validation is None else float(validation)
    if not 0 < fraction < 1:
        raise ProgramError(f"fit: the validation fraction must be in (0, 1), not {fraction}")
    order = np.random.default_rng(settings.seed).permutation(len(x))
    n_val = round(len(x) * fraction)
    if n_val == 0 or n_val == len(x):
        raise ProgramError(f"fit: a validation fraction of {fraction} of {len(x)} samples leaves "
                           f"a split empty")
    return {"train": (x[order[n_val:]], y[order[n_val:]]),
            "val": (x[order[:n_val]], y[order[:n_val]])}


def _hook(callback) -> Callable[[dict], None]:
    """A callback: a callable given each epoch's row, or an object with Keras' on_epoch_end(epoch,
    logs)."""
    if hasattr(callback, "on_epoch_end"):
        return lambda row: callback.on_epoch_end(row["epoch"] - 1, row)
    if callable(callback):
        return callback
    raise ProgramError(f"fit: a callback is a function of the epoch's row or has on_epoch_end; "
                       f"got {callback!r}")


def load_run(path, backend: str | None = None):
    """The trained program of run folder `path` (`graphc train`'s output): its final parameters
    and its input preprocessing, on `backend` (None: the one its train block asks for), with the
    run's settings after the command line's overrides."""
    run = RunFolder(path)
    if not RunFolder.is_run(run.path):
        raise error(f"{run.path}: not a graphc run folder (no config.json and model/)",
                    hint="runs are made by `graphc train FILE.nn`; an artifact folder loads with "
                         "graphc.load_artifact")
    program, _ = run.load_trained(backend)
    program.meta["train"] = run.config()["settings"]
    return program
