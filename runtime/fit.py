"""The Python API a Keras or PyTorch user reaches for: `Program.fit` on in-memory arrays (the
train block's optimizer, schedule, early stopping and scaling, through the same `Trainer` as
`graphc train`), its `History`, and `Program.predict` on raw samples."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from graphc.errors import ProgramError
from graphc.ir.types import TensorType
from graphc.runtime.train import METRIC_COLUMNS, Trainer, TrainSettings, data_of_splits


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
    if len(x) == 0:
        raise ProgramError("fit: x holds no samples")
    if isinstance(validation, (tuple, list)):
        if len(validation) != 2:
            raise ProgramError("fit: validation is (x_val, y_val) or a fraction")
        x_val, y_val = (np.asarray(v) for v in validation)
        if len(x_val) == 0 or len(x_val) != len(y_val):
            raise ProgramError(f"fit: validation holds {len(x_val)} samples and {len(y_val)} "
                               f"labels; it needs as many of each, at least one")
        return {"train": (x, y), "val": (x_val, y_val)}
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


def predict(program, x, batch: int):
    """Program.predict: forward over `x` in chunks of `batch` samples."""
    name = program.feature_input()
    samples, single = as_samples(np.asarray(x), program.inputs[name], name)
    out = forward_batched(program, name, samples, batch)
    if single:
        out = {k: v[0] for k, v in out.items()}
    task = program.meta.get("task") or {}
    key = task.get("output") or (program.outputs[0] if len(program.outputs) == 1 else None)
    return out[key] if key is not None else out


def forward_batched(program, name: str, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """The outputs of `program.forward` over samples `x` of input `name`, `batch` at a time."""
    if batch < 1:
        raise ProgramError(f"the batch size must be at least 1, not {batch}")
    chunks = [program.forward(**{name: x[i:i + batch]}) for i in range(0, max(len(x), 1), batch)]
    return {k: np.concatenate([c[k] for c in chunks]) for k in program.outputs}


def as_samples(x: np.ndarray, ttype: TensorType, name: str) -> tuple[np.ndarray, bool]:
    """Rows of samples shaped for input `name` of type `ttype`, and whether `x` was a single
    sample (it gets a batch axis); samples of the right size are reshaped (28x28 images for a
    784 input)."""
    sample_shape = tuple(ttype.shape[1:])
    if not all(isinstance(d, int) for d in sample_shape):
        return x, False
    per_sample = math.prod(sample_shape)
    if x.dtype.kind not in "fiub":
        raise ProgramError(f"input {name}: expected numbers, found an array of {x.dtype}")
    if x.size == per_sample and x.ndim <= len(sample_shape) + 1 and (
            x.ndim < len(ttype.shape) or x.shape[0] != 1):
        return x.reshape((1,) + sample_shape), True
    if x.ndim >= 1 and x.size == len(x) * per_sample:
        return x.reshape((len(x),) + sample_shape), False
    raise ProgramError(f"an array of shape {list(x.shape)} does not hold samples for input "
                       f"{name}: {ttype} ({per_sample} values each)")
